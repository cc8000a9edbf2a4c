"""FSDP2 for a LoraModel: each block sharded on its own, then the root (embeddings, head, the adapter store).

``torch.distributed.fsdp.fully_shard`` works on the blocks and the LoraModel directly, but the wrapped model
still holds the full base weights (the graph shares its Parameter objects), so nothing is freed. ``fully_shard``
here shards the same way and then points the wrapped model's own parameters at the shards, so each rank keeps
only its share of the base weights plus one block's gathered weights at a time. The adapter store is sharded
with the root; ``lm.save_pretrained`` gathers it into an ordinary PEFT checkpoint (every rank calls it, the main
process writes).

Example (``torchrun --nproc-per-node 2 train.py``)::

    dist.init_process_group("gloo")             # "nccl" on GPUs
    lm = lora_fx.lorafy(model, rules, example_inputs=(ids,))
    lora_fx.fully_shard(lm)                     # per block, then the root
    ...train...
    lm.save_pretrained("out", is_main_process=dist.get_rank() == 0)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import AdapterError
from .passes.fold import HOLDER


def fully_shard(lm: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Shard ``lm`` with FSDP2 (``torch.distributed.fsdp.fully_shard``): every block, then ``lm`` itself; keyword
    arguments (``mesh``, ``reshard_after_forward``, ...) go to each call. The root is resharded after forward too
    (FSDP2 keeps it gathered by default), so embeddings and head are not held whole through backward. Returns
    ``lm``."""
    from torch.distributed.fsdp import fully_shard as shard

    fsdp_kwargs.setdefault("reshard_after_forward", True)
    if lm.merged_adapters:
        raise AdapterError(f"Adapters {lm.merged_adapters} are merged; unmerge() before sharding (a merge writes "
                           "the full base weights).")
    if lm.adapter_bank is not None:
        raise AdapterError("The adapters are routed through an adapter bank, whose slots are views of one stacked "
                           "tensor per target that sharding would split; remove_adapter_bank() before sharding.")
    for block in lm.blocks.values():
        shard(block, **fsdp_kwargs)
    shard(lm, **fsdp_kwargs)
    _point_model_at_shards(lm)
    lm.forget_graphs()  # graphs of other call signatures and generation hold the full weights: dropped
    lm.configure(sharded=True)
    return lm


def _point_model_at_shards(lm: nn.Module) -> None:
    """The wrapped model's parameters become the sharded ones (by path), so the full tensors lose their last
    reference."""
    source = lm.state.captured.source
    skip = (f"{lm.state.store_name}.", f"{HOLDER}.")
    for path, param in lm.graph_module.named_parameters(remove_duplicate=False):
        if path.startswith(skip):
            continue
        owner_path, _, leaf = path.rpartition(".")
        try:
            owner = source.get_submodule(owner_path) if owner_path else source
        except AttributeError:
            continue
        if isinstance(dict(owner.named_parameters(recurse=False)).get(leaf), nn.Parameter):
            owner.register_parameter(leaf, param)
