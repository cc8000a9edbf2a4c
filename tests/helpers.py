"""Test helpers: PEFT twins with the same adapter weights, relative errors, closed-form references."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from zoo import Case, output_tensor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def peft_keys(peft_model) -> list[str]:
    return sorted(k for k, m in peft_model.base_model.model.named_modules()
                  if getattr(m, "lora_A", None) or getattr(m, "lora_embedding_A", None))


def peft_twin(case: Case, lm, adapter: str = "default", dtype=torch.float32, **config) -> torch.nn.Module:
    """A PEFT model of a fresh copy of ``case``'s model (in ``dtype``) with ``lm``'s adapter weights copied in."""
    config.setdefault("target_modules", case.targets)
    config.setdefault("fan_in_fan_out", case.fan_in_fan_out)
    pm = get_peft_model(case.build().to(dtype), LoraConfig(**config)).eval()
    with torch.no_grad():
        for key in peft_keys(pm):
            mod = pm.base_model.model.get_submodule(key)
            unit = lm.adapters.unit(adapter, key)
            if unit.kind == "embedding":
                mod.lora_embedding_A["default"].copy_(unit.lora_A)
                mod.lora_embedding_B["default"].copy_(unit.lora_B)
            else:
                mod.lora_A["default"].weight.copy_(unit.lora_A)
                mod.lora_B["default"].weight.copy_(unit.lora_B)
    return pm


def all_nodes(lm):
    """Every node a forward runs: the outer graph's, then each block's program (once per block)."""
    yield from lm.graph_module.graph.nodes
    for block in lm.blocks.values():
        yield from block.graph.nodes


def run(model, case: Case, inputs: tuple | None = None) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(*(inputs if inputs is not None else case.inputs())))
