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

import ctypes
import ctypes.util
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

    base, out = Path(base), check_out(Path(out), Path(base), Path(adapter), force)
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


def _save_atomically(model, base: Path, out: Path) -> None:
    """Write into a temporary sibling, then put it in place: renamed when ``out`` is absent, swapped with it in
    one atomic exchange when it exists (Linux ``renameat2``), so ``out`` is complete at every moment."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
    try:
        model.save_pretrained(tmp)
        for extra in base.iterdir():  # tokenizer and other side files travel with the model
            if (extra.is_file() and extra.name not in _MODEL_FILES and not _WEIGHT_FILES.match(extra.name)
                    and not (tmp / extra.name).exists()):
                shutil.copy2(extra, tmp / extra.name)
        if not out.exists():
            os.replace(tmp, out)
            return
        if not exchange(tmp, out):  # no atomic exchange here: the shortest window, old moved aside first
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            tmp = old
    finally:
        _remove(tmp)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def clean_stale(out: Path) -> None:
    """Remove the temporary and old directories that killed runs for ``out`` left (their process is gone); an
    old ``out`` that a run killed between its two renames moved aside is put back first."""
    for leftover in sorted(out.parent.glob(f".{out.name}.*-*")):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)(?:-.*)?", leftover.name)
        if not match or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists() and not out.is_symlink():
            os.replace(leftover, out)
        else:
            _remove(leftover)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
