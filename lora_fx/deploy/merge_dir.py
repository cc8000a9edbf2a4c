"""``lora-fx merge``: a local transformers model directory + a PEFT adapter directory -> a merged model
directory that ``AutoModel*.from_pretrained`` loads.

The merge runs through lora_fx's fold pass (float32 math, one rounding). Weights whose tie was broken by the
merge (a tied embedding that was targeted) are saved untied (``tie_word_embeddings=False``). The output is
written into a temporary sibling directory and renamed into place (swapped atomically with an existing one),
so an interrupted merge leaves no half directory and ``--out`` is never missing; what killed runs left is
removed by the next run. A non-empty ``--out`` is refused unless ``force``; a symlinked ``--out`` is written
through; an ``--out`` that holds the inputs or the working directory is refused.

Example::

    lora-fx merge --base ./tiny-llama --adapter ./my-adapter --out ./tiny-llama-merged
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from ..api import from_peft
from ..atomic import replace_dir
from ..errors import CheckpointError
from ..report import RewriteReport

_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_MODEL_FILES = ("config.json", "generation_config.json")


def merge_model_dir(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                    force: bool = False, progress: bool = True) -> RewriteReport:
    """Merge ``adapter`` into the model in ``base`` and save the result to ``out``; returns the report."""
    base, out = Path(base), check_out(Path(out), Path(base), Path(adapter), force)
    model = load_model_dir(base)
    lm = from_peft(model, adapter, example_inputs=(EXAMPLE_IDS,))
    keys = {u.key for _, u in lm.adapters.iter_units()}
    with tqdm(total=len(keys), desc="merging", disable=not progress, ncols=80) as bar:
        lm.merge(safe=True, keep_original=False, progress=lambda key: bar.update(1))
    report = lm.report()
    if lm.state.merge is not None and lm.state.merge.untied:
        model.config.tie_word_embeddings = False

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for extra in base.iterdir():  # tokenizer and other side files travel with the model
            if (extra.is_file() and extra.name not in _MODEL_FILES and not _WEIGHT_FILES.match(extra.name)
                    and not (tmp / extra.name).exists()):
                shutil.copy2(extra, tmp / extra.name)
    replace_dir(out, build)
    return report


EXAMPLE_IDS = torch.zeros((1, 8), dtype=torch.long)  # what the command line captures with (dimensions are dynamic)


def load_model_dir(base: Path) -> torch.nn.Module:
    """The transformers model saved in ``base`` (its own architecture class), in eval mode."""
    import transformers

    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base / 'config.json'} not found: --base must be a transformers model directory.")
    config = transformers.AutoConfig.from_pretrained(base)
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    return (model_cls or transformers.AutoModel).from_pretrained(base, dtype="auto").eval()


def check_out(out: Path, base: Path, adapter: Path, force: bool) -> Path:
    """The directory to write (a symlinked ``--out`` is written through: its target), or a refusal by name."""
    if out.is_symlink() and not out.exists():
        raise CheckpointError(f"--out {out} is a symlink to nothing; remove it or point it at a directory.")
    target = out.resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise CheckpointError(f"--out {out} exists and is not empty; choose another directory or pass --force.")
    for name, other in (("the current directory", Path.cwd()), ("--base", base), ("--adapter", adapter)):
        other = other.resolve()
        if target == other or target in other.parents:
            raise CheckpointError(f"--out {out} is {name} or contains it; replacing it would delete the inputs or "
                                  "the working directory. Choose a new directory.")
    if target.parent == target:
        raise CheckpointError(f"--out {out} is the filesystem root; choose a new directory.")
    return target
