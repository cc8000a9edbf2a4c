import atexit
import os
import shutil
import sys
import tempfile
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)
# the capture cache of this run starts empty and lives in a temporary folder, never in the user's own
os.environ["LORA_FX_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora_fx_test_cache_")
atexit.register(shutil.rmtree, os.environ["LORA_FX_CACHE_DIR"], True)
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")

from zoo import ZOO  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (adapter inits, dropout masks), whatever ran before."""
    torch.manual_seed(1234)


@pytest.fixture(params=list(ZOO), ids=list(ZOO))
def case(request):
    return ZOO[request.param]


@pytest.fixture(params=[n for n, c in ZOO.items() if c.peft], ids=[n for n, c in ZOO.items() if c.peft])
def peft_case(request):
    return ZOO[request.param]
