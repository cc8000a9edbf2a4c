"""``lora-fx merge``: a local transformers model directory + a PEFT adapter directory -> a merged model
directory that ``AutoModel*.from_pretrained`` loads.

The merge runs through lora_fx's fold pass (float32 math, one rounding). Weights whose tie was broken by the
merge (a tied embedding that was targeted) are saved untied (``tie_word_embeddings=False``). The output is
written into a temporary sibling directory and renamed into place, so an interrupted merge leaves no half
directory; a non-empty ``--out`` is refused unless ``force``.

Example::

    lora-fx merge --base ./tiny-llama --adapter ./my-adapter --out ./tiny-llama-merged
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from .api import from_peft
from .checkpoint import current_umask
from .errors import CheckpointError
from .report import RewriteReport

_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_MODEL_FILES = ("config.json", "generation_config.json")


def merge_model_dir(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                    force: bool = False, progress: bool = True) -> RewriteReport:
    """Merge ``adapter`` into the model in ``base`` and save the result to ``out``; returns the report."""
    import transformers

    base, out = Path(base), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"--out {out} exists and is not empty; choose another directory or pass --force.")
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base / 'config.json'} not found: --base must be a transformers model directory.")
    config = transformers.AutoConfig.from_pretrained(base)
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    model = (model_cls or transformers.AutoModel).from_pretrained(base, dtype="auto").eval()
    ids = torch.zeros((1, 8), dtype=torch.long)
    lm = from_peft(model, adapter, example_inputs=(ids,))
    keys = {u.key for _, u in lm.adapters.iter_units()}
    with tqdm(total=len(keys), desc="merging", disable=not progress, ncols=80) as bar:
        lm.merge(safe=True, keep_original=False, progress=lambda key: bar.update(1))
    report = lm.report()
    if any("untied" in row["action"] for row in report.rows):
        model.config.tie_word_embeddings = False
    _save_atomically(model, base, out)
    return report


def _save_atomically(model, base: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
    try:
        model.save_pretrained(tmp)
        for extra in base.iterdir():  # tokenizer and other side files travel with the model
            if (extra.is_file() and extra.name not in _MODEL_FILES and not _WEIGHT_FILES.match(extra.name)
                    and not (tmp / extra.name).exists()):
                shutil.copy2(extra, tmp / extra.name)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
