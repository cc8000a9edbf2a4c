"""EVA (PEFT's ``init_lora_weights="eva"`` with ``eva_config``): A from the principal directions of each target's
inputs on sample data, ranks redistributed across layers by explained variance, B zero. As PEFT computes it:

- each target gets ``round(r·rho)`` components of an incremental PCA (``ipca``) of its inputs (the tokens the
  attention mask, and the labels' -100 with ``use_label_mask``, keep), over batches cycled until the components a
  layer needs agree with the previous batch's (cosine >= ``tau``); targets fed identical inputs share one PCA;
- the rank budget (the sum of the targets' r) goes to the components with the largest explained variance ratio;
- A = the first ``rank`` components (divided by √singular value with ``whiten``), B = 0; alpha scales with the
  new rank when ``adjust_scaling_factors``; a target given rank 0 gets no adapter.

``get_eva_state_dict(model, dataloader, config)`` computes ``{module name: A}`` on the model (a LoraModel's base);
``initialize_lora_eva_weights(lm, dataloader=... or eva_state_dict=...)`` replaces the adapter by one with those
ranks and A's (one verb), saved with its ``rank_pattern`` / ``alpha_pattern`` so PEFT loads it.

Example::

    lm = lora_fx.lorafy(model, LoraConfig(..., init_lora_weights="eva", eva_config=EvaConfig()), example_inputs=...)
    lora_fx.initialize_lora_eva_weights(lm, dataloader)
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import RuleError
from .gathered import linear_targets, rank_of
from .ipca import IncrementalPCA

EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}


def eva_settings(config: Any) -> dict[str, Any]:
    value = getattr(config, "eva_config", None) if not isinstance(config, dict) else config.get("eva_config")
    if value is None:
        return dict(EVA_DEFAULTS)
    value = value if isinstance(value, dict) else {k: getattr(value, k) for k in EVA_DEFAULTS}
    return {**EVA_DEFAULTS, **value}


def _rows(batch: dict, eva: dict) -> torch.Tensor:
    """The (batch, position) indices of the tokens EVA learns from."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if eva["use_label_mask"] and "labels" in batch:
        mask = mask & (batch["labels"] != eva["label_mask_value"])
    return mask.nonzero()


class _Gather:
    """A forward hook keeping a target's selected input tokens (hash only, or an incremental PCA)."""

    def __init__(self, components: int | None, tau: float) -> None:
        self.pca = IncrementalPCA(components) if components else None
        self.tau, self.rows, self.hashes = tau, None, []
        self.converged = torch.zeros(components or 0, dtype=torch.bool)

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        x = x[self.rows.T.unbind()] if self.rows is not None else x.reshape(-1, x.shape[-1])
        if self.pca is None:
            self.hashes.append(hash(tuple(x.detach().cpu().reshape(-1).tolist())))
            return
        if x.shape[0] < self.pca.n_components:
            return
        before = None if self.pca.components_ is None else self.pca.components_.clone()
        self.pca.partial_fit(x.detach().float())
        if before is not None:
            self.converged = torch.nn.functional.cosine_similarity(self.pca.components_, before) >= self.tau


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, config: Any,
                       forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                       eva: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """{module name: A} for the linear modules ``config`` (a LoraConfig with ``eva_config``, or Rules with ``eva``
    settings) selects; ``forward_fn(model, batch)`` runs a batch (default ``model(**batch)``)."""
    eva, forward = eva or eva_settings(config), forward_fn or (lambda m, b: m(**b))
    targets = dict(linear_targets(model, config, "get_eva_state_dict"))
    if len(dataloader) == 0:
        raise RuleError("get_eva_state_dict: the dataloader is empty.")
    ranks = {name: rank_of(config, name) for name in targets}
    rho = eva["rho"]
    if rho > 1000:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // next(iter(ranks.values())))
    most = {name: round(r * rho) for name, r in ranks.items()}
    budget = sum(ranks.values())
    training = model.training
    model.eval()
    try:
        first = next(iter(dataloader))
        hooks = {name: _Gather(None, eva["tau"]) for name in targets}
        handles = {name: m.register_forward_hook(hooks[name]) for name, m in targets.items()}
        for hook in hooks.values():
            hook.rows = _rows(first, eva)
        forward(model, first)
        for h in handles.values():
            h.remove()
        groups: dict[int, list[str]] = {}
        for name, hook in hooks.items():
            groups.setdefault(hook.hashes[0], []).append(name)
        same = {other: names[0] for names in groups.values() if len(names) > 1 for other in names[1:]}
        for names in groups.values():
            top = max(most[n] for n in names)
            for n in names:
                most[n] = top
        hooks = {name: _Gather(most[name], eva["tau"]) for name in targets if name not in same}
        handles = {name: targets[name].register_forward_hook(hook) for name, hook in hooks.items()}
        owner = {**{n: n for n in hooks}, **same}
        done = dict.fromkeys(hooks, False)
        dist = dict(most)
        for batch in itertools.cycle(dataloader):
            rows = _rows(batch, eva)
            for name, hook in hooks.items():
                converged = bool(torch.all(hook.converged[:dist[name]]))
                if not done[name] and converged and handles[name] is not None:
                    handles[name].remove()
                    handles[name], done[name] = None, True
                    continue
                if done[name] and not converged:
                    handles[name], done[name] = targets[name].register_forward_hook(hook), False
                hook.rows = rows
            if all(done.values()):
                break
            forward(model, batch)
            if any(h.pca.components_ is None for h in hooks.values()):
                continue
            dist = _distribute(hooks, owner, same, budget, most)
    finally:
        for h in (locals().get("handles") or {}).values():
            if h is not None:
                h.remove()
        model.train(training)
    out = {}
    for name, rank in dist.items():
        pca = hooks[owner[name]].pca
        a = pca.components_[:rank]
        out[name] = a / pca.singular_values_[:rank].sqrt().reshape(-1, 1) if eva["whiten"] else a
    return out


def _distribute(hooks, owner, same, budget, most) -> dict[str, int]:
    """The rank budget over the layers by explained variance ratio (PEFT's ``_get_rank_distribution``)."""
    ratios = {k: h.pca.explained_variance_ratio_[:most[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in owner.items() for c in ratios[name]])
    index = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in index[:budget]])
    counts = {k: counts.get(k, 0) for k in owner}
    for k, k_hook in same.items():  # a layer that owns the shared PCA keeps the larger rank
        if counts[k_hook] < counts[k]:
            counts[k_hook], counts[k] = counts[k], counts[k_hook]
    return counts


def initialize_lora_eva_weights(lm: Any, dataloader: Iterable | None = None,
                                eva_state_dict: dict[str, torch.Tensor] | None = None,
                                adapter_name: str = "default",
                                forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """Replace adapter ``adapter_name`` (made with ``init="eva"``) by EVA's ranks and A's (see the module)."""
    from ..rules import Rule, RuleSet

    entry = lm.state.entry(adapter_name)
    units = entry.by_key
    eva = eva_settings(entry.peft_config or {})
    if eva_state_dict is None:
        if dataloader is None:
            raise RuleError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict.")
        ruleset = RuleSet([Rule(tuple(units))], rank_pattern={k: u.r for k, u in units.items()})
        eva_state_dict = get_eva_state_dict(lm.state.captured.source, dataloader, ruleset, forward_fn, eva)
    rules = []
    for key, unit in units.items():
        w = eva_state_dict.get(key)
        if w is None:
            rules.append(Rule(key, r=unit.r, alpha=unit.alpha, dropout=unit.dropout_p, use_rslora=unit.use_rslora))
            continue
        rank = w.shape[0]
        if rank == 0:
            continue
        alpha = unit.alpha * rank / unit.r if eva["adjust_scaling_factors"] and rank != unit.r else unit.alpha
        rules.append(Rule(key, r=rank, alpha=alpha, dropout=unit.dropout_p, use_rslora=unit.use_rslora, init="eva"))
    tensors = {key: {"lora_A": w} for key, w in eva_state_dict.items() if key in units and w.shape[0]}
    lm.replace_adapter(adapter_name, rules, tensors)

