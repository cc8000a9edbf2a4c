"""Translate a ``peft.LoraConfig`` (or its JSON dict) into lora_fx rules, and an adapter's units back into the
``adapter_config.json`` PEFT needs to rebuild them.

``target_modules`` as a string is a full-match regex (``re:``); as a list, plain names (exact or dotted
suffix). ``exclude_modules`` becomes leading exclude rules. ``rank_pattern`` / ``alpha_pattern`` keep
PEFT's lookup: the first pattern ``p`` for which ``(.*\\.)?(p)$`` matches the key.

Example::

    ruleset_from_peft_config(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..errors import CheckpointError, RuleError
from ..rules.rule import Rule, RuleSet
from ..variants import inits, mixed, peft_fields, rule_fields

# Options that change what PEFT builds and that this version does not reproduce: refuse, never ignore.
_UNSUPPORTED_WHEN_SET = (
    "megatron_config",
    "arrow_config",
)


def is_peft_config(obj: Any) -> bool:
    """Whether ``obj`` is a ``peft.LoraConfig`` (checked by name: PEFT need not be imported)."""
    return any(c.__name__ == "LoraConfig" for c in type(obj).__mro__) and hasattr(obj, "target_modules")


def config_fields(config: Any) -> dict[str, Any]:
    """A LoraConfig object or an adapter_config.json dict as a plain dict."""
    if isinstance(config, Mapping):
        return dict(config)
    return {k: getattr(config, k) for k in dir(config) if not k.startswith("_") and not callable(getattr(config, k))}


def ruleset_from_peft_config(config: Any) -> RuleSet:
    """Rules equivalent to PEFT's targeting for ``config`` (a LoraConfig or its dict form)."""
    c = config_fields(config)
    peft_type = str(c.get("peft_type", "LORA")).split(".")[-1].upper()
    if peft_type != "LORA":
        raise RuleError(f"PEFT config has peft_type={peft_type!r}; lora_fx reads LoRA configs only.")
    init = c.get("init_lora_weights", True)
    if init == "default" or not inits.is_init(init):  # named first: PEFT fills e.g. eva_config from it
        raise RuleError(
            f"LoraConfig.init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'orthogonal', "
            "'mica', 'loftq', 'lora_ga', 'corda', 'eva', 'pissa', 'pissa_niter_<K>' or 'olora'."
        )
    if c.get("arrow_config") not in (None, {}):
        raise RuleError("LoraConfig.arrow_config: an Arrow router is built over task adapters already loaded; use "
                        "lora_fx.create_arrow_model(model, task_specific_adapter_paths, arrow_config, "
                        "general_adapter_paths, example_inputs=...), as PEFT's create_arrow_model.")
    for name in _UNSUPPORTED_WHEN_SET:
        if c.get(name) not in (None, [], {}, ""):
            raise RuleError(
                f"LoraConfig.{name}={c[name]!r} is not supported by this version of lora_fx; "
                f"remove it from the config or express the targeting with lora_fx Rules."
            )
    _check_values(c)

    targets, parameters = c.get("target_modules"), c.get("target_parameters") or None
    if targets is None and parameters is None:
        raise RuleError(
            "LoraConfig.target_modules=None: lora_fx has no per-architecture default; name the targets, "
            "e.g. ['q_proj', 'v_proj'], a regex like '.*\\.(q|v)_proj', or 'all-linear' (or target_parameters for "
            "weights such as a mixture-of-experts' 'mlp.experts.gate_up_proj')."
        )
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    match = "*" if all_linear else "re:" + targets if isinstance(targets, str) else tuple(sorted(targets or ()))
    hyper = dict(
        r=c.get("r", 8), alpha=c.get("lora_alpha", 8), dropout=c.get("lora_dropout", 0.0),
        init=init, use_rslora=bool(c.get("use_rslora", False)), **rule_fields(c), kasa=_sub_config(c, "kasa_config"),
        velora=_sub_config(c, "velora_config"),
        loftq=_sub_config(c, "loftq_config") or None if init == "loftq" else None,
        lora_ga=_sub_config(c, "lora_ga_config") if init == "lora_ga" else None,
        corda=_sub_config(c, "corda_config") if init == "corda" else None,
        monteclora=_sub_config(c, "monteclora_config"), alora=c.get("alora_invocation_tokens") or None,
        qalora=c.get("qalora_group_size", 16) if c.get("use_qalora") else None,
    )
    rules = []
    excludes = c.get("exclude_modules")
    if excludes:
        ex_match = "re:" + excludes if isinstance(excludes, str) else tuple(sorted(excludes))
        rules.append(Rule(ex_match, exclude=True))
    if match:
        rules.append(Rule(match, kinds={"linear"} if all_linear else None, **hyper))
    if parameters is not None:  # PEFT's target_parameters: parameter paths, matched like target_modules' names
        rules.append(Rule(tuple(sorted([parameters] if isinstance(parameters, str) else parameters)),
                          kinds={"param"}, **hyper))
    layers, pattern = c.get("layers_to_transform"), c.get("layers_pattern")
    if isinstance(targets, str) or layers in (None, []):  # PEFT applies layers_to_transform to lists only
        layers = None
    elif isinstance(layers, int):
        layers = (layers,)
    if isinstance(pattern, str):
        pattern = (pattern,)
    return RuleSet(rules, dict(c.get("rank_pattern") or {}), dict(c.get("alpha_pattern") or {}),
                   layers=tuple(layers) if layers is not None else None,
                   layers_pattern=tuple(pattern) if pattern else None, exclude_output_layer=all_linear,
                   bias=c.get("bias", "none") or "none",
                   modules_to_save=_modules_to_save(c), optional_saves=TASK_HEADS.get(c.get("task_type"), ()),
                   trainable_token_indices=c.get("trainable_token_indices") or None,
                   ensure_weight_tying=bool(c.get("ensure_weight_tying", False)),
                   layer_replication=tuple(tuple(s) for s in c["layer_replication"]) if c.get("layer_replication")
                   else None, bdlora=_bdlora(c),
                   peft_config=_as_given(c))


# The heads PEFT's task models add to modules_to_save (PeftModelForSequenceClassification, ...), where present
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def _bdlora(c: dict[str, Any]) -> dict[str, Any] | None:
    """PEFT's ``use_bdlora`` (a ``BdLoraConfig`` or its dict form) as a dict, or None."""
    value = c.get("use_bdlora")
    if value is None or value is False:
        return None
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict) or not isinstance(value.get("nblocks", 1), int) or value.get("nblocks", 1) < 1:
        raise RuleError(f"LoraConfig.use_bdlora={value!r}: use a BdLoraConfig (target_modules_bd_a, "
                        "target_modules_bd_b, nblocks >= 1, match_strict).")
    return dict(value)


_SUB_CONFIGS = {"kasa_config": ("KasaConfig", ("beta", "gamma")),
                "velora_config": ("VeloraConfig", ("num_groups", "scale", "init_type")),
                "loftq_config": ("LoftQConfig", ("loftq_bits", "loftq_iter")),
                "lora_ga_config": ("LoraGAConfig", ("direction", "scale", "stable_gamma")),
                "corda_config": ("CordaConfig", ("cache_file", "covariance_file", "corda_method", "verbose",
                                                 "use_float16_for_covariance", "prune_temporary_fields")),
                "eva_config": ("EvaConfig", ("rho", "tau", "use_label_mask", "label_mask_value", "whiten",
                                             "adjust_scaling_factors")),
                "monteclora_config": ("MontecloraConfig", ("num_samples", "use_entropy", "dirichlet_prior",
                                                           "sample_scaler", "kl_loss_weight", "buffer_size"))}


def _sub_config(c: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A variant's PEFT sub-config (``KasaConfig``, ``VeloraConfig`` or its dict form) as a dict for its Rule field
    (the Rule fills PEFT's defaults and checks the values), or None."""
    value = c.get(name)
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    cls, fields = _SUB_CONFIGS[name]
    if not isinstance(value, dict) or set(value) - set(fields):
        raise RuleError(f"LoraConfig.{name}={value!r}: use a {cls} ({', '.join(fields)}).")
    return dict(value)


def _modules_to_save(c: dict[str, Any]) -> tuple[str, ...] | None:
    given = tuple(c.get("modules_to_save") or ())
    return given + tuple(n for n in TASK_HEADS.get(c.get("task_type"), ()) if n not in given) or None


# What a saved adapter_config.json keeps of the user's LoraConfig as given (the rest is computed from the units)
AS_GIVEN = ("task_type", "target_modules", "target_parameters", "exclude_modules", "layers_to_transform",
            "layers_pattern",
            "modules_to_save", "base_model_name_or_path", "revision", "r", "lora_alpha", "rank_pattern",
            "alpha_pattern", "lora_dropout", "trainable_token_indices", "ensure_weight_tying",
            "layer_replication", "use_bdlora", "eva_config")
TASKS = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
         "ForQuestionAnswering": "QUESTION_ANS", "ForConditionalGeneration": "SEQ_2_SEQ_LM",
         "ForSeq2SeqLM": "SEQ_2_SEQ_LM"}


def _as_given(c: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in AS_GIVEN:
        if name in c:
            value = c[name]
            value = str(value).split(".")[-1] if name == "task_type" and value is not None else value
            value = _bdlora(c) if name == "use_bdlora" else _sub_config(c, name) if name == "eva_config" else value
            out[name] = sorted(value) if isinstance(value, (set, frozenset)) else value
    return out


def task_type(model: Any) -> str | None:
    """PEFT's task type for a transformers model class (``LlamaForCausalLM`` -> ``CAUSAL_LM``), else None."""
    name = type(model).__name__
    return next((task for suffix, task in TASKS.items() if name.endswith(suffix)), None)


def with_given(computed: dict[str, Any], given: dict[str, Any] | None, units: list) -> dict[str, Any]:
    """``computed`` with the user's own fields written back as given: always the descriptive ones (task type,
    target modules, ...), and the rank/alpha fields when they describe these units exactly."""
    if not given:
        return computed
    out = dict(computed)
    out.update({k: v for k, v in given.items() if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                                            "lora_dropout") and v is not None})
    if all(k in given for k in ("r", "lora_alpha")) and _describes(given, units):
        for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "lora_dropout"):
            if k in given:
                out[k] = given[k] if given[k] is not None else computed[k]
    return out


def _describes(given: dict[str, Any], units: list) -> bool:
    """Whether PEFT, reading ``given``'s r / alpha / patterns, builds each unit with its rank and scaling."""
    try:
        ruleset = RuleSet([Rule("*")], dict(given.get("rank_pattern") or {}), dict(given.get("alpha_pattern") or {}))
        base = Rule("*", r=given["r"], alpha=given["lora_alpha"])
    except (RuleError, TypeError):
        return False
    for u in units:
        rule = ruleset.effective(base, u.key)
        if rule.r != u.variant.peft_rank(u) or rule.alpha != u.variant.peft_alpha(u):
            return False
    dropouts = {u.dropout_p for u in units}
    return len(dropouts) == 1 and given.get("lora_dropout", 0.0) in dropouts


def with_slices(ruleset: RuleSet, sliced: Mapping[str, Mapping[str, Any]]) -> RuleSet:
    """``ruleset`` with the output-sliced keys a lora_fx checkpoint records (``variants.sliced.METADATA``) first:
    each gets its own rule and its own rank/alpha pattern, ahead of the whole-layer rank PEFT's config names."""
    if not sliced:
        return ruleset
    base = next(rule for rule in reversed(ruleset.rules) if not rule.exclude)
    rules, ranks, alphas = [], {}, {}
    for key, s in sliced.items():
        exact = re.escape(key)
        rules.append(replace(base, match="re:" + exact, kinds=None, r=s["r"], alpha=s["alpha"],
                             out_slices=tuple(tuple(p) for p in s["slices"])))
        ranks[exact], alphas[exact] = s["r"], s["alpha"]
    return replace(ruleset, rules=[*rules, *ruleset.rules], rank_pattern={**ranks, **ruleset.rank_pattern},
                   alpha_pattern={**alphas, **ruleset.alpha_pattern})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_NAME_LISTS = ("target_modules", "target_parameters", "exclude_modules")  # a string (a regex) or a list of names
_LISTS = ("modules_to_save", "layers_pattern")  # lists of names (PEFT's layers_pattern may be one string)
_PATTERNS = ("rank_pattern", "alpha_pattern")  # {pattern: value}
_FLAGS = ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "ensure_weight_tying", "inference_mode",
          "use_qalora")


def _check_types(c: dict[str, Any]) -> None:
    """Refuse fields of the wrong type by name (a JSON file can hold anything: ``"use_rslora": "false"`` is a
    string, not False; ``modules_to_save: "lm_head"`` is not a list)."""
    def names(v: Any) -> bool:
        return isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v)

    for field in _NAME_LISTS:
        v = c.get(field)
        if v is not None and not isinstance(v, str) and not names(v):
            raise RuleError(f"LoraConfig.{field}={v!r}: use a list of module names or a regex string.")
    for field in _LISTS:
        v = c.get(field)
        if v is not None and not names(v) and not (field == "layers_pattern" and isinstance(v, str)):
            raise RuleError(f"LoraConfig.{field}={v!r}: use a list of names, e.g. [{str(v)!r}].")
    for field in _PATTERNS:
        v = c.get(field)
        if v is not None and not (isinstance(v, dict) and all(isinstance(k, str) for k in v)):
            raise RuleError(f"LoraConfig.{field}={v!r}: use a dict from key pattern to value, e.g. {{'q_proj': 4}}.")
    for field in _FLAGS:
        v = c.get(field)
        if v is not None and not isinstance(v, bool):
            raise RuleError(f"LoraConfig.{field}={v!r}: use true or false (a {type(v).__name__} is not a flag).")
    layers = c.get("layers_to_transform")
    ints = isinstance(layers, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
    if layers is not None and not ints and not (isinstance(layers, int) and not isinstance(layers, bool)):
        raise RuleError(f"LoraConfig.layers_to_transform={layers!r}: use a layer index or a list of them.")


def _check_values(c: dict[str, Any]) -> None:
    """Refuse ill-typed fields by name before anything is built (a rank must be an integer: 4.9 is not 4)."""
    _check_types(c)
    fields = {"r": c.get("r", 8), **{f"rank_pattern[{k!r}]": v for k, v in (c.get("rank_pattern") or {}).items()}}
    for name, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RuleError(f"LoraConfig.{name}={value!r}: a rank must be a positive integer.")
    alphas = {"lora_alpha": c.get("lora_alpha", 8),
              **{f"alpha_pattern[{k!r}]": v for k, v in (c.get("alpha_pattern") or {}).items()}}
    for name, value in alphas.items():
        if not _number(value):
            raise RuleError(f"LoraConfig.{name}={value!r}: alpha must be a number.")
    dropout = c.get("lora_dropout", 0.0)
    if not _number(dropout) or not 0 <= dropout < 1:
        raise RuleError(f"LoraConfig.lora_dropout={dropout!r}: use a number in [0, 1).")
    for field in ("rank_pattern", "alpha_pattern"):
        for pattern in c.get(field) or {}:
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, TypeError) as e:
                raise RuleError(f"LoraConfig.{field} key {pattern!r} is not a valid regular expression "
                                f"({e}).") from None


def config_for_units(units: list, fan_in_fan_out: bool, base_model: str | None, bias: str = "none") -> dict[str, Any]:
    """A LoraConfig dict that makes PEFT build exactly these units (per-key r/alpha as patterns)."""
    r = Counter(u.variant.peft_rank(u) for u in units).most_common(1)[0][0]
    alpha = Counter(u.variant.peft_alpha(u) for u in units).most_common(1)[0][0]
    dropouts = Counter(u.dropout_p for u in units)
    if len(dropouts) > 1:
        warnings.warn(f"PEFT has one lora_dropout per adapter; saving the most common of {sorted(dropouts)}.",
                      stacklevel=4)
    rslora = {u.use_rslora for u in units}
    clash = (["use_rslora"] if len(rslora) > 1 else []) + mixed(u.variant for u in units)
    if clash:
        raise CheckpointError(f"PEFT cannot express an adapter that mixes {' / '.join(clash)} True and False across "
                              "keys; save the two groups as separate adapters.")
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropouts.most_common(1)[0][0],
        "target_modules": sorted(u.key for u in units if not u.strategy.explicit) or None,
        "target_parameters": sorted(u.key for u in units if u.strategy.explicit) or None, "exclude_modules": None,
        "rank_pattern": {u.key: u.variant.peft_rank(u) for u in units if u.variant.peft_rank(u) != r},
        "alpha_pattern": {u.key: u.variant.peft_alpha(u) for u in units if u.variant.peft_alpha(u) != alpha},
        "fan_in_fan_out": fan_in_fan_out, "bias": bias, "use_rslora": rslora.pop(),
        "modules_to_save": None, "init_lora_weights": _init_for_peft(units), "layers_to_transform": None,
        "layers_pattern": None, **peft_fields(u.variant for u in units), "use_bdlora": _bdlora_for(units),
        **_variant_config(units),
    }


def _variant_config(units: list) -> dict[str, Any]:
    """The variants' own PEFT config fields (``kasa_config``): PEFT has one value per adapter, for every unit."""
    fields: dict[str, Any] = {}
    for u in units:
        for name, value in u.variant.peft_config_fields().items():
            if fields.setdefault(name, value) != value:
                raise CheckpointError(f"PEFT has one {name} per adapter; these units have {fields[name]} and {value}. "
                                      "Save them as separate adapters.")
    partial = [name for name in fields if not all(name in u.variant.peft_config_fields() for u in units)]
    if partial:
        raise CheckpointError(f"PEFT applies {partial[0]} to every target of an adapter; these units mix it with "
                              "plain ones. Save them as separate adapters.")
    return fields


def _bdlora_for(units: list) -> dict[str, Any] | None:
    """``use_bdlora`` that makes PEFT build these units' block-diagonal factors (by module name, as PEFT matches)."""
    bd = [u for u in units if getattr(u.variant, "side", None)]
    if not bd:
        return None
    sides = {u.key.rpartition(".")[2]: u.variant.side for u in bd}
    blocks = {u.variant.nblocks for u in bd}
    plain = {u.key.rpartition(".")[2] for u in units if u not in bd}
    if len(blocks) > 1 or plain & set(sides) or len(sides) != len({(u.key.rpartition(".")[2], u.variant.side)
                                                                    for u in bd}):
        raise CheckpointError("PEFT's use_bdlora has one nblocks per adapter and names modules by their last name; "
                              "these units mix block counts or sides under one name. Save them as separate adapters.")
    return {"target_modules_bd_a": sorted(n for n, s in sides.items() if s == "A"),
            "target_modules_bd_b": sorted(n for n, s in sides.items() if s == "B"),
            "nblocks": blocks.pop(), "match_strict": not plain}


def _init_for_peft(units: list) -> bool | str:
    """Inits from W keep their scheme, so PEFT re-derives the residual base when loading them."""
    schemes = {u.init for u in units if inits.is_weight_init(u.init) or u.init in (*inits.VARIANT_INITS, "eva")}
    if len(schemes) > 1 or (schemes and len(schemes) != len({u.init for u in units})):
        raise CheckpointError(f"PEFT cannot express an adapter that mixes inits {sorted(map(str, schemes))} with "
                              "others; save them as separate adapters.")
    return schemes.pop() if schemes else True
