"""Match rules against found targets: which keys get LoRA, with which rule, and which rules went unused.

Example::

    m = match_targets(find_targets(gm, model), as_ruleset(["q_proj", "v_proj"]), "LlamaForCausalLM")
    m.rules_by_key["model.layers.0.self_attn.q_proj"].r
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from ..errors import RuleError, RuleWarning, preview
from ..targets import Target, Unsupported
from .rule import Rule, RuleSet, match_pattern


@dataclass
class Matched:
    targets: list[Target]  # matched target nodes, in graph order (a key may have several nodes)
    rules_by_key: dict[str, Rule]  # the effective rule (per-key overrides applied) of each key, in graph order
    unused_rules: list[str]  # labels of rules that decided no key

    @property
    def first(self) -> dict[str, Target]:
        """The first target node of each key."""
        out: dict[str, Target] = {}
        for t in self.targets:
            out.setdefault(t.key, t)
        return out


def match_targets(found: list[Target | Unsupported], ruleset: RuleSet, model_name: str,
                  source: nn.Module | None = None) -> Matched:
    """Apply ``ruleset`` to ``found``; raise RuleError when nothing matches, an unsupported node does, or an entry
    names a module of ``source`` holding weights that no target covers (its uses are not ones lora_fx adapts)."""
    targets, rules_by_key, used = [], {}, set()
    for t in found:
        rule = ruleset.decide(t.key, t.kind)
        if rule is None:
            continue
        used.add(id(rule))
        if rule.exclude:
            continue
        if isinstance(t, Unsupported):
            raise RuleError(
                f"Rule {rule.label} matches {t.key!r} (node {t.node!r}, kind {t.kind!r}), which lora_fx "
                f"cannot adapt: {t.reason}. Exclude it with Rule({t.key!r}, exclude=True) or narrow the rule."
            )
        targets.append(t)
        rules_by_key[t.key] = ruleset.effective(rule, t.key)
    if not targets:
        keys = sorted({t.key for t in found if isinstance(t, Target) and not t.strategy.explicit})
        labels = [r.label for r in ruleset.rules if not r.exclude]
        raise RuleError(
            f"Rules {', '.join(labels)} matched no target in {model_name}. "
            + (f"Targetable keys include: {preview(keys)}. " if keys else "The model has no targetable layer. ")
            + "A plain name matches a key or its last dotted parts, a glob matches the whole key, "
            "'re:...' is a full-match regex." + _explicit_hint(found, ruleset)
        )
    unused = [r.label for r in ruleset.rules if id(r) not in used]
    hit = {p for t in found for r in ruleset.rules for p in r.matching(t.key, t.kind)}
    typos = [p for r in ruleset.rules if not r.exclude for p in r.patterns if p not in hit]
    if source is not None:
        _refuse_uncovered_modules(typos, source, found, model_name)
    if typos:
        warnings.warn(f"Rule entries {preview(typos)} matched no target in {model_name} (the other entries did); "
                      "check their spelling. A plain name matches a key or its last dotted parts.", RuleWarning,
                      stacklevel=5)
        unused += [repr(p) for p in typos if repr(p) not in unused]
    return Matched(targets, rules_by_key, unused)


def _explicit_hint(found: list, ruleset: RuleSet) -> str:
    """Name the targets of kinds a rule reaches only by naming them (parameter targets) that a rule's patterns
    match: the rule lacks ``kinds``."""
    near = sorted({t.key for t in found if isinstance(t, Target) and t.strategy.explicit
                   for r in ruleset.rules if not r.exclude and any(match_pattern(p, t.key) for p in r.patterns)})
    if not near:
        return ""
    kinds = sorted({t.kind for t in found if isinstance(t, Target) and t.key in near})
    return (f" {preview(near, 4)} are parameter targets (PEFT's target_parameters, e.g. expert weights): a rule "
            f"reaches them with kinds={kinds[0]!r} (Rule(..., kinds={kinds[0]!r}), or target_parameters in a "
            "LoraConfig).")


def _refuse_uncovered_modules(patterns: list, source: nn.Module, found: list, model_name: str) -> None:
    """An entry that matched no target but names a module with weights of its own: those weights are used in a
    way lora_fx does not adapt (or never used); say so rather than drop the entry."""
    for p in patterns:
        for path, module in source.named_modules():
            if not path or not match_pattern(p, path) or not any(True for _ in module.parameters(recurse=False)):
                continue
            inside = sorted({t.key for t in found if isinstance(t, Target) and t.key.startswith(path + ".")})
            hint = (f"Its weights are targets under other keys: {preview(inside)}; target those." if inside else
                    "No op lora_fx adapts (a linear, embedding or convolution form) reads its weights in the captured "
                    "graph; target the layers it calls, or exclude it.")
            raise RuleError(f"Rule entry {p!r} matches {path!r} ({type(module).__name__}) in {model_name}, which is no "
                            f"target. {hint}")
