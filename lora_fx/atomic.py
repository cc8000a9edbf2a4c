"""Atomic writes: a file or a directory is either the old one or the complete new one, never half written.

- ``temp_write(path, write)``: write through a temporary sibling (usual permissions), returned for a later rename;
- ``atomic_write(path, write)``: the same, renamed into place;
- ``replace_dir(out, build)``: build a directory in a temporary sibling, then swap it in (``renameat2`` exchange
  where Linux has it); what killed runs left is cleaned first;
- ``clean_temporaries(directory, names)``: remove the temporary files killed writers left beside ``names``;
- ``commit_files(pairs, journal)``: put several staged files in place as one snapshot (all old or all new): the
  old files are moved aside under a journal first, put back on any error, and by ``recover(journal)`` (run by the
  next save or load) after a kill.

Example::

    atomic_write(Path("model.pt2"), lambda tmp: torch.export.save(program, tmp))
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def current_umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_write(path: Path, write: Callable[[str], object]) -> Path:
    """Write through ``write(tmp)`` to a temporary file beside ``path``, with the usual permissions; returns it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; a saved file gets the usual permissions
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write ``path`` through a temporary file in the same directory and an atomic rename."""
    os.replace(temp_write(path, write), path)


def clean_temporaries(directory: Path, names: Iterable[str]) -> None:
    """Remove the temporary files that killed writes of ``names`` left in ``directory`` (``temp_write``'s, and
    safetensors' own ``<name>.tmpXXXXXX``)."""
    for name in names:
        stem, suffix = Path(name).stem, Path(name).suffix
        for leftover in (*directory.glob(f".{stem}.*.tmp{suffix}"), *directory.glob(f"{name}.tmp*")):
            leftover.unlink(missing_ok=True)


def replace_dir(out: Path, build: Callable[[Path], None]) -> None:
    """Build ``out`` in a temporary sibling (``build(tmp)``), then put it in place: renamed when ``out`` is absent,
    swapped with it in one atomic exchange when it exists, so ``out`` is complete at every moment."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_dirs(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
    try:
        build(tmp)
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
        remove(tmp)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def clean_stale_dirs(out: Path) -> None:
    """Remove the temporary and old directories that killed runs for ``out`` left (their process is gone); an
    old ``out`` that a run killed between its two renames moved aside is put back first."""
    for leftover in sorted(out.parent.glob(f".{out.name}.*-*")):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)(?:-.*)?", leftover.name)
        if not match or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists() and not out.is_symlink():
            os.replace(leftover, out)
        else:
            remove(leftover)


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


def remove(path: Path) -> None:
    """Remove a file, a link or a directory tree; absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _backup(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def commit_files(pairs: list[tuple[Path, Path]], journal: Path) -> None:
    """Rename each staged ``(tmp, final)`` into place, as one snapshot. The journal (written first) lists the
    finals and which of them existed; each existing final is moved to a backup before its new file goes in; any
    error puts every old file back (a kill leaves the journal, for ``recover``). The journal and backups go once
    all are in place."""
    recover(journal)
    finals = [final for _, final in pairs]
    existed = [final for final in finals if final.exists()]
    try:
        record = json.dumps({"finals": [str(f) for f in finals], "existed": [str(f) for f in existed],
                             "pid": os.getpid()})
        listed = temp_write(journal, lambda p: Path(p).write_text(record))
        try:
            os.replace(listed, journal)
        finally:
            listed.unlink(missing_ok=True)
        for tmp, final in pairs:
            if final in existed:
                os.replace(final, _backup(final))
            os.replace(tmp, final)
    except BaseException:
        _roll_back(finals, existed)
        for tmp, _ in pairs:
            Path(tmp).unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        raise
    journal.unlink()
    for final in existed:
        _backup(final).unlink(missing_ok=True)


def _roll_back(finals: list[Path], existed: list[Path]) -> None:
    """Every final as it was: its backup back where one was made; removed where it did not exist before; left
    alone where it existed and was not moved yet."""
    for final in reversed(finals):
        backup = _backup(final)
        if backup.exists():
            os.replace(backup, final)
        elif final not in existed:
            final.unlink(missing_ok=True)


def recover(journal: Path) -> None:
    """Undo a snapshot a killed ``commit_files`` left half done (its journal exists and its writer is gone: a save
    still running in another process is left to finish)."""
    if not journal.exists():
        return
    try:
        record = json.loads(journal.read_text())
        finals, existed = [Path(f) for f in record["finals"]], [Path(f) for f in record["existed"]]
        writer = int(record.get("pid", 0))
    except (ValueError, OSError, KeyError, TypeError, AttributeError):
        finals, existed, writer = [], [], 0
    if writer and writer != os.getpid() and _alive(writer):
        return
    _roll_back(finals, existed)
    journal.unlink(missing_ok=True)
