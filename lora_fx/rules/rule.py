"""Rules: which graph targets get LoRA, and with which hyper-parameters.

Rules are ordered; the first rule that matches a target's key decides. An ``exclude`` rule that
matches stops the search (the target gets no LoRA). Matching on a key ``k``:

- plain name ``"q_proj"``: ``k == "q_proj"`` or ``k.endswith(".q_proj")`` (PEFT's list semantics);
- glob (contains ``* ? [``): ``fnmatch(k, pattern)`` over the whole key;
- ``"re:<regex>"``: ``re.fullmatch(regex, k)``.

Example::

    rules = [Rule("lm_head", exclude=True), Rule("re:.*layers\\.[01]\\..*_proj", r=16, alpha=32), "fc*"]
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import RuleError
from ..kinds import KINDS
from ..variants import inits
from .variant_fields import (
    corda_field,
    kasa_field,
    loftq_field,
    lora_ga_field,
    monteclora_field,
    qalora_field,
    velora_field,
)

BIAS_MODES = ("none", "all", "lora_only")


_PEFT_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "match (the first argument)",
               "init_lora_weights": "init", "exclude_modules": "a Rule(..., exclude=True) before it",
               "rank": "r", "modules": "match (the first argument)"}


class _Checked(type):
    """Names PEFT's argument names given to ``Rule`` (``lora_alpha=16``) with the field to use instead."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        known = {f for f in cls.__dataclass_fields__}
        wrong = [k for k in kwargs if k not in known]
        if wrong:
            hints = [f"{k} -> {_PEFT_NAMES[k]}" for k in wrong if k in _PEFT_NAMES]
            raise RuleError(f"Rule got unknown argument(s) {wrong}" + (f" ({'; '.join(hints)} in lora_fx)" if hints
                                                                        else "") + f"; Rule takes {sorted(known)}. A "
                            "peft.LoraConfig can be passed to lorafy as it is.")
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class Rule(metaclass=_Checked):
    """One targeting rule with the LoRA hyper-parameters it assigns.

    ``y = W x + s · B A dropout(x)`` with ``s = alpha / r`` (``alpha / sqrt(r)`` when ``use_rslora``).

    Example::

        Rule(["q_proj", "v_proj"], r=8, alpha=16, dropout=0.05)
    """

    match: str | tuple[str, ...]
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    kinds: frozenset[str] | None = None
    exclude: bool = False
    init: bool | str = "default"
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False  # PEFT's lora_bias: B gets a bias, ``delta = s·(B A x + b)``
    out_slices: tuple[tuple[int, int], ...] | None = None  # output ranges with their own A and B (fused qkv)
    block_diagonal: tuple[str, int] | None = None  # BD-LoRA: ("A" or "B", nblocks), that factor block-diagonal
    kasa: tuple[float, float] | None = None  # KaSA: (beta, gamma) of its regularizer; True for PEFT's defaults
    velora: tuple[int, float, str] | None = None  # VeLoRA: (num_groups, scale, init_type); True for PEFT's defaults
    loftq: tuple[int, int] | None = None  # init="loftq": (bits 4 or 8, iterations); default (4, 1)
    lora_ga: tuple[str, str, int] | None = None  # init="lora_ga": (direction, scale, stable_gamma)
    corda: str | None = None  # init="corda": "ipm" (default) or "kpm"
    monteclora: tuple | None = None  # MonteCLoRA: PEFT's MontecloraConfig values (a dict or True for its defaults)
    arrow: Any = None  # Arrow: the router's ``variants.arrow.ArrowSpec`` (built by ``create_arrow_model``)
    alora: tuple[int, ...] | None = None  # activated LoRA: the invocation token ids (PEFT's alora_invocation_tokens)
    qalora: int | None = None  # QA-LoRA: the input's pooling group size (PEFT's qalora_group_size); True for 16

    def __post_init__(self) -> None:
        patterns = (self.match,) if isinstance(self.match, str) else tuple(self.match)
        object.__setattr__(self, "match", patterns if len(patterns) != 1 else patterns[0])
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise RuleError(f"{self!r}: match must be a non-empty string or a sequence of them.")
        for p in patterns:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise RuleError(f"Rule {p!r}: invalid regular expression ({e}).") from None
        if self.kinds is not None:
            kinds = frozenset([self.kinds] if isinstance(self.kinds, str) else self.kinds)
            unknown = kinds - set(KINDS)
            if unknown:
                raise RuleError(f"Rule {self.label}: unknown kinds {sorted(unknown)}; use any of {sorted(KINDS)}.")
            object.__setattr__(self, "kinds", kinds)
        if self.exclude:
            return
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise RuleError(f"Rule {self.label}: r must be a positive integer, got {self.r!r}.")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha)
                or self.alpha <= 0):
            raise RuleError(f"Rule {self.label}: alpha must be a positive number, got {self.alpha!r}.")
        dropout_ok = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not dropout_ok or not 0.0 <= self.dropout < 1.0:
            raise RuleError(f"Rule {self.label}: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.lora_bias and self.use_dora:
            raise RuleError(f"Rule {self.label}: lora_bias=True is not supported with DoRA (PEFT refuses it too).")
        if self.out_slices is not None:
            object.__setattr__(self, "out_slices", _check_slices(self.label, self.out_slices))
            if self.use_dora or self.lora_bias or inits.is_weight_init(self.init):
                raise RuleError(f"Rule {self.label}: out_slices gives each slice its own A and B; DoRA, lora_bias "
                                "and PiSSA/OLoRA describe the whole layer. Drop them or the slices.")
        if not inits.is_init(self.init):
            raise RuleError(f"Rule {self.label}: init must be one of {inits.NAMES}, got {self.init!r}.")
        if self.block_diagonal is not None:
            side, n = (tuple(self.block_diagonal) + (None, None))[:2]
            if side not in ("A", "B") or not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise RuleError(f"Rule {self.label}: block_diagonal must be ('A' or 'B', nblocks >= 1), got "
                                f"{self.block_diagonal!r}.")
            if self.use_dora or self.lora_bias or self.out_slices or inits.is_weight_init(self.init) or (
                    self.init in ("mica", "orthogonal")):
                raise RuleError(f"Rule {self.label}: block_diagonal (BD-LoRA) is plain LoRA with one factor "
                                "block-diagonal; drop DoRA, lora_bias, out_slices or the init from W.")
            object.__setattr__(self, "block_diagonal", (side, n))
        object.__setattr__(self, "kasa", kasa_field(self) if self.kasa not in (None, False) else None)
        object.__setattr__(self, "velora", velora_field(self) if self.velora not in (None, False) else None)
        for name in ("loftq", "lora_ga", "corda"):
            if getattr(self, name) is not None and self.init != name:
                raise RuleError(f"Rule {self.label}: {name}={getattr(self, name)!r} sets up init={name!r}, but the "
                                f"rule's init is {self.init!r}; pass init={name!r} too.")
        object.__setattr__(self, "loftq", loftq_field(self) if self.init == "loftq" else None)
        object.__setattr__(self, "lora_ga", lora_ga_field(self) if self.init == "lora_ga" else None)
        object.__setattr__(self, "corda", corda_field(self) if self.init == "corda" else None)
        object.__setattr__(self, "monteclora", monteclora_field(self) if self.monteclora not in (None, False) else None)
        object.__setattr__(self, "qalora", None if self.qalora is None or self.qalora is False else qalora_field(self))
        if self.alora is not None:
            tokens = tuple(self.alora) if isinstance(self.alora, (list, tuple)) else None
            if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
                raise RuleError(f"Rule {self.label}: alora must be a non-empty sequence of token ids, got "
                                f"{self.alora!r}.")
            object.__setattr__(self, "alora", tokens)
        separate = ("kasa", "velora", "monteclora", "arrow", "alora", "qalora")
        chosen = [n for n in separate if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise RuleError(f"Rule {self.label}: {' and '.join(chosen)} are separate PEFT variants; choose one.")

    @property
    def patterns(self) -> tuple[str, ...]:
        return (self.match,) if isinstance(self.match, str) else self.match

    @property
    def label(self) -> str:
        return repr(self.match)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def takes(self, kind: str) -> bool:
        """Whether this rule looks at targets of ``kind``: its ``kinds``, else every kind but the explicit ones
        (parameter targets are reached by naming ``kinds="param"``, as PEFT's ``target_parameters`` does)."""
        if self.kinds is None:
            return kind not in KINDS or not KINDS[kind].explicit
        return kind in self.kinds

    def matches(self, key: str, kind: str) -> bool:
        return self.takes(kind) and any(match_pattern(p, key) for p in self.patterns)

    def matching(self, key: str, kind: str) -> list[str]:
        """The patterns of this rule that match ``key`` (none when the kind is not the rule's)."""
        if not self.takes(kind):
            return []
        return [p for p in self.patterns if match_pattern(p, key)]


def _bd_side(bdlora: dict[str, Any], key: str) -> str | None:
    """PEFT's BD-LoRA matching: a pattern *contained in* the target's module name (its last key part)."""
    name = key.rpartition(".")[2]
    side_a = any(p in name for p in bdlora.get("target_modules_bd_a") or ())
    side_b = any(p in name for p in bdlora.get("target_modules_bd_b") or ())
    if side_a and side_b:
        raise RuleError(f"use_bdlora: {key!r} matches both target_modules_bd_a and target_modules_bd_b.")
    if not (side_a or side_b) and bdlora.get("match_strict", True):
        raise RuleError(f"use_bdlora: {key!r} matches neither target_modules_bd_a nor target_modules_bd_b (set "
                        "match_strict=False to give it plain LoRA).")
    return "A" if side_a else "B" if side_b else None


def _check_slices(label: str, slices: Any) -> tuple[tuple[int, int], ...]:
    """``slices`` as sorted ``((start, stop), ...)``; refuses empty, reversed or overlapping ranges."""
    try:
        out = tuple(sorted((int(a), int(b)) for a, b in slices))
        exact = all(isinstance(v, int) and not isinstance(v, bool) for pair in slices for v in pair)
    except (TypeError, ValueError):
        exact = False
    if not exact or not out:
        raise RuleError(f"Rule {label}: out_slices must be a non-empty sequence of (start, stop) integer pairs, got "
                        f"{slices!r}.")
    for (a, b), nxt in zip(out, out[1:] + ((None, None),)):
        if a < 0 or b <= a:
            raise RuleError(f"Rule {label}: out_slices range ({a}, {b}) is empty or negative; use 0 <= start < stop.")
        if nxt[0] is not None and nxt[0] < b:
            raise RuleError(f"Rule {label}: out_slices ranges ({a}, {b}) and {nxt} overlap; each output feature "
                            "belongs to one slice at most.")
    return out


def match_pattern(pattern: str, key: str) -> bool:
    """True when ``pattern`` (plain name, glob or ``re:`` regex) matches ``key``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], key) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(key, pattern)
    return key == pattern or key.endswith("." + pattern)


def _pattern_key(patterns: Iterable[str], key: str) -> str | None:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: first pattern p with ``(.*\\.)?(p)$`` matching."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


def layer_index(key: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """PEFT's layer index of a key: the first number after ``<pattern>.`` (any segment when no pattern)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = next((m for p in layers_pattern if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
    return int(m["idx"]) if m else None


@dataclass
class RuleSet:
    """Ordered rules plus PEFT's per-key options: ``rank_pattern`` / ``alpha_pattern`` overrides,
    ``layers`` (``layers_to_transform``, with ``layers_pattern``) and ``exclude_output_layer`` (all-linear)."""

    rules: list[Rule]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_output_layer: bool = False
    bias: str = "none"  # PEFT's bias: "none" | "all" (every bias trainable) | "lora_only" (targeted layers')
    modules_to_save: tuple[str, ...] | None = None  # PEFT's: whole modules trained as copies, saved in full
    optional_saves: tuple[str, ...] = ()  # names in modules_to_save a model may lack (a task's head: "score")
    trainable_token_indices: Any = None  # PEFT's: [rows] of the input embedding, or {module name: [rows]}
    ensure_weight_tying: bool = False  # PEFT's: tied layers follow the embedding's adapter
    layer_replication: tuple[tuple[int, int], ...] | None = None  # PEFT's: layers stacked again before capture
    bdlora: dict[str, Any] | None = None  # PEFT's use_bdlora: which keys get a block-diagonal A or B, nblocks
    peft_config: dict[str, Any] | None = None  # the LoraConfig these rules came from (saved back as given)

    def _block_diagonal(self, rule: Rule, key: str) -> Rule:
        if not self.bdlora or rule.exclude:
            return rule
        side = _bd_side(self.bdlora, key)
        return replace(rule, block_diagonal=(side, int(self.bdlora.get("nblocks", 1)))) if side else rule

    def __post_init__(self) -> None:
        if self.bias not in BIAS_MODES:
            raise RuleError(f"bias={self.bias!r}: use one of {BIAS_MODES}.")

    def decide(self, key: str, kind: str) -> Rule | None:
        """The first rule that matches (an exclude rule included), or None."""
        rule = next((rule for rule in self.rules if rule.matches(key, kind)), None)
        if rule is not None and not rule.exclude and self.layers is not None:
            if layer_index(key, self.layers_pattern) not in self.layers:
                return None
        return rule

    def effective(self, rule: Rule, key: str) -> Rule:
        """``rule`` with PEFT's per-key ``rank_pattern`` / ``alpha_pattern`` overrides and ``use_bdlora`` applied."""
        rule = self._block_diagonal(rule, key)
        r_key = _pattern_key(self.rank_pattern, key)
        a_key = _pattern_key(self.alpha_pattern, key)
        if r_key is None and a_key is None:
            return rule
        r = self.rank_pattern[r_key] if r_key is not None else rule.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else rule.alpha
        return replace(rule, r=r, alpha=alpha)
