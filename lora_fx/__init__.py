"""lora_fx: LoRA as a compiler pass over torch.fx / torch.export graphs."""

from .api import from_peft, lorafy
from .capture.disk import clear_capture_cache
from .deploy import PackagedGenerator, compile, export, package, package_generation, swap_adapter
from .distributed import fully_shard
from .errors import AdapterError, CaptureError, CheckpointError, LoraFxError, MergeError, RuleError, RuleWarning
from .model import LoraModel
from .report import RewriteReport
from .rules import Rule, RuleSet
from .variants.arrow import create_arrow_model
from .variants.corda import preprocess_corda
from .variants.eva import get_eva_state_dict, initialize_lora_eva_weights
from .variants.loraga import preprocess_loraga

__all__ = [
    "lorafy", "from_peft", "compile", "export", "package", "package_generation", "PackagedGenerator", "swap_adapter",
    "fully_shard", "clear_capture_cache",
    "preprocess_loraga", "preprocess_corda", "create_arrow_model", "get_eva_state_dict", "initialize_lora_eva_weights",
    "Rule", "RuleSet",
    "LoraModel", "RewriteReport",
    "LoraFxError", "RuleError", "CaptureError", "AdapterError", "CheckpointError", "MergeError", "RuleWarning",
]
__version__ = "0.1.0"
