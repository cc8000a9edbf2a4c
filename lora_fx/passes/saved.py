"""modules_to_save pass: point every graph use of a saved module at the active adapter's trainable copy.

PEFT's ``modules_to_save`` (a classifier head, say) trains a full copy of a module per adapter while the
original stays frozen. Here the copy lives in the adapter store and the pass re-targets the graph's
``call_module`` / ``get_attr`` nodes that read the module (or anything below it) to the copy;
``restore_saved`` puts the original targets back.

Example::

    swap_saved(gm, {"classifier": "lora.default.saved.classifier"})
"""

from __future__ import annotations

from torch import fx

from .common import TAG


def swap_saved(gm: fx.GraphModule, copies: dict[str, str]) -> int:
    """Re-target nodes reading module path ``p`` (or below it) to ``copies[p]``; returns the count."""
    n = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or TAG in node.meta:
            continue
        for path, copy_path in copies.items():
            if node.target == path or node.target.startswith(path + "."):
                node.meta[TAG] = {"role": "saved", "target": node.target}
                node.target = copy_path + node.target[len(path):]
                n += 1
                break
    if n:
        gm.recompile()
    return n


def restore_saved(gm: fx.GraphModule) -> int:
    """Undo ``swap_saved``."""
    n = 0
    for node in gm.graph.nodes:
        tag = node.meta.get(TAG)
        if tag and tag.get("role") == "saved":
            node.target = tag["target"]
            del node.meta[TAG]
            n += 1
    if n:
        gm.recompile()
    return n
