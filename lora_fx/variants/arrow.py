"""Arrow (PEFT's ``arrow_config``, ``create_arrow_model``): a router adapter that sends each token through the top-k
of a library of task LoRAs. Per target, with the task adapters' ``A_e``, ``B_e``, scalings ``s_e`` and prototypes
``p_e`` (the top right singular vector of ``B_e A_e``, by 15 power iterations from a seeded draw)::

    c = |x · p_e| over e;  keep the top_k, softmax(c / temperature) (the others 0)
    y' = y + Σ_e c_e · s_e · B_e A_e x

With ``use_gks`` the mean of the general adapters' A and B is subtracted from each task adapter first (PEFT's
General Knowledge Subtraction). The router holds copies of the experts' tensors (taken when it is built: rebuild it
after changing them); PEFT's router has its own unused A and B, kept frozen here too. Not mergeable (each token has
its own mix), routable, fusable or combinable; its checkpoint is the task adapters' (save those, build the router
again with ``create_arrow_model``).

Example::

    lm = lora_fx.create_arrow_model(model, ["task_a/", "task_b/"], ArrowConfig(top_k=1), example_inputs=(ids,))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, MergeError, RuleError
from .base import Variant


@dataclass(eq=False)
class ArrowSpec:
    """What a router is built from: per key, the task experts' stacked A [E, r, in], B [E, out, r] and scalings."""

    experts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    top_k: int = 3
    temperature: float = 1.0
    rng_seed: int | None = None
    task_names: tuple[str, ...] = ()
    gks_names: tuple[str, ...] = field(default_factory=tuple)


def prototype(a: torch.Tensor, b: torch.Tensor, seed: int | None, iters: int = 15, eps: float = 1e-8) -> torch.Tensor:
    """The top right singular vector of ``B A`` (the dominant eigenvector of ``Aᵀ BᵀB A``), by power iteration."""
    a32, b32 = a.float(), b.float()
    gram = b32.T @ b32
    gen = None
    if seed is not None:
        gen = torch.Generator(device=a32.device.type)
        gen.manual_seed(int(seed))
    v = torch.randn(a32.shape[1], dtype=a32.dtype, device=a32.device, generator=gen)
    v = v / (v.norm() + eps)
    for _ in range(iters):
        w = a32.T @ (gram @ (a32 @ v))
        v = w / (w.norm() + eps)
    return v


def arrow_delta(x: torch.Tensor, prototypes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                top_k: int, temperature: float) -> torch.Tensor:
    """``Σ_e c_e · s_e · B_e A_e x`` with each token's top-k prototype coefficients (see the module docstring)."""
    tokens = x.reshape(-1, x.shape[-1])
    sim = torch.abs(tokens @ prototypes.T)
    top, index = torch.topk(sim, top_k, dim=1)
    score = tokens.new_full(sim.shape, float("-inf")).scatter(1, index, top)
    coeff = torch.softmax(score / temperature, dim=1)
    y = torch.einsum("ter,eor->teo", torch.einsum("tf,erf->ter", tokens, a), b) * scales.view(1, -1, 1)
    return torch.einsum("te,teo->to", coeff, y).reshape(*x.shape[:-1], -1)


class Arrow(Variant):
    name = "arrow"
    label = "Arrow"
    field = "arrow_config"
    routable = fusable = combinable = stacks = False
    frozen = ("lora_A", "lora_B")

    def __init__(self, spec: ArrowSpec) -> None:
        self.spec = spec

    def __repr__(self) -> str:
        return f"Arrow(experts={len(self.spec.task_names)}, top_k={self.spec.top_k})"

    def params(self) -> tuple:
        return (id(self.spec), self.spec.top_k, self.spec.temperature)

    def check(self, key, kind, geometry, r):
        if kind.name != "linear" or geometry.left:
            raise RuleError(f"Arrow on {key!r}: PEFT's Arrow routes over linear layers (this is a {kind.name}).")
        if key not in self.spec.experts:
            raise RuleError(f"Arrow on {key!r}: none of the task adapters {list(self.spec.task_names)} targets it.")

    @torch.no_grad()
    def init(self, unit, weight):
        a, b, scales = self.spec.experts[unit.key]
        dtype, device = unit.lora_A.dtype, unit.lora_A.device
        unit.register_buffer("arrow_a", a.to(device, dtype).clone())
        unit.register_buffer("arrow_b", b.to(device, dtype).clone())
        unit.register_buffer("arrow_scales", scales.to(device, dtype).clone())
        protos = [prototype(a[e], b[e], self.spec.rng_seed).to(device, dtype) for e in range(a.shape[0])]
        unit.register_buffer("arrow_prototypes", torch.stack(protos))

    def delta(self, unit, dtype=torch.float32):
        raise MergeError(f"{unit.key!r} has an Arrow router: each token takes its own mix of the task adapters, so "
                         "no single ΔW represents it (PEFT refuses to merge it too). Merge a task adapter instead.")

    def peft_tensors(self, unit):
        raise CheckpointError("an Arrow router is built from the task adapters (lora_fx.create_arrow_model); save "
                              "those (lm.save_pretrained(dir, selected_adapters=[...])) and build the router again.")

    def eager(self, unit, x, context=None):
        return arrow_delta(x, unit.arrow_prototypes, unit.arrow_a, unit.arrow_b, unit.arrow_scales, self.spec.top_k,
                           self.spec.temperature)

    def emit(self, bb):
        x = bb.cast()
        spec = self.spec
        tensors = [bb.tensor(n) for n in ("arrow_prototypes", "arrow_a", "arrow_b", "arrow_scales")]
        d = bb.new("call_function", arrow_delta, (x, *tensors, spec.top_k, spec.temperature), "lora_arrow")
        return bb.new("call_function", operator.add, (bb.y, d), "lora")


def arrow_spec(lm: Any, task_names: list[str], config: Any, gks_names: list[str]) -> tuple[ArrowSpec, int]:
    """The router's spec from adapters loaded in ``lm`` (same targets and rank, as PEFT checks), and that rank."""
    units = {n: lm.adapters.units(n) for n in [*task_names, *gks_names]}
    reference = units[task_names[0]]
    for n, us in units.items():
        if set(us) != set(reference):
            raise RuleError(f"Arrow: adapter {n!r} targets {sorted(us)[:4]}..., not the same layers as "
                            f"{task_names[0]!r}; Arrow routes over adapters of one shape.")
        for key, u in us.items():
            if u.lora_A.shape != reference[key].lora_A.shape or u.lora_B.shape != reference[key].lora_B.shape:
                raise RuleError(f"Arrow: adapter {n!r} has other shapes on {key!r} (rank {u.r} vs "
                                f"{reference[key].r}); Arrow routes over adapters of one rank.")
            if type(u.variant) is not Variant:
                raise RuleError(f"Arrow: adapter {n!r} is {u.variant.label} on {key!r}; Arrow routes plain LoRAs.")
    experts = {}
    with torch.no_grad():
        for key in reference:
            a = torch.stack([units[n][key].lora_A.detach() for n in task_names])
            b = torch.stack([units[n][key].lora_B.detach() for n in task_names])
            if gks_names:  # General Knowledge Subtraction
                a = a - torch.stack([units[n][key].lora_A.detach() for n in gks_names]).mean(0)
                b = b - torch.stack([units[n][key].lora_B.detach() for n in gks_names]).mean(0)
            scales = torch.tensor([units[n][key].scaling for n in task_names])
            experts[key] = (a, b, scales)
    spec = ArrowSpec(experts, int(getattr(config, "top_k", 3)), float(getattr(config, "router_temperature", 1.0)),
                     getattr(config, "rng_seed", None), tuple(task_names), tuple(gks_names))
    return spec, next(iter(reference.values())).r


def create_arrow_model(base_model: nn.Module, task_specific_adapter_paths: list[str], arrow_config: Any,
                       general_adapter_paths: list[str] | None = None, **lorafy_kwargs: Any) -> Any:
    """PEFT's ``create_arrow_model``: a LoraModel with the task adapters (``task_0``, ...), the general ones with
    ``use_gks`` (``gks_0``, ...) and the active ``arrow_router`` over them. ``lorafy_kwargs``: ``example_inputs``
    and the like, as ``lora_fx.from_peft`` takes them."""
    from ..api import from_peft
    from ..rules import Rule

    if not task_specific_adapter_paths:
        raise RuleError("create_arrow_model: task_specific_adapter_paths needs at least one adapter directory.")
    general = list(general_adapter_paths or ())
    if getattr(arrow_config, "use_gks", False) and not general:
        raise RuleError("create_arrow_model: use_gks=True subtracts the general adapters; pass general_adapter_paths.")
    tasks = [f"task_{i}" for i in range(len(task_specific_adapter_paths))]
    gks = [f"gks_{i}" for i in range(len(general))] if getattr(arrow_config, "use_gks", False) else []
    top_k = int(getattr(arrow_config, "top_k", 3))
    if not 1 <= top_k <= len(tasks):
        raise RuleError(f"create_arrow_model: top_k={top_k} must be between 1 and the {len(tasks)} task adapters.")
    lm = from_peft(base_model, task_specific_adapter_paths[0], adapter_name=tasks[0], **lorafy_kwargs)
    for name, path in [*zip(tasks[1:], task_specific_adapter_paths[1:]), *zip(gks, general)]:
        lm.load_adapter(path, adapter_name=name)
    spec, r = arrow_spec(lm, tasks, arrow_config, gks)
    lm.add_adapter("arrow_router", Rule(tuple(spec.experts), r=r, arrow=spec))
    lm.set_adapter("arrow_router")
    return lm
