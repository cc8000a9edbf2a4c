"""The variant fields of a Rule (``kasa``, ``velora``, ``monteclora``, ``loftq``, ``lora_ga``, ``corda``, ``qalora``):
PEFT's defaults filled in and the values checked, naming the rule. Each returns the tuple the variant is built from.

Example::

    kasa_field(Rule("q_proj", kasa=True))          # (1e-4, 1e-3)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import RuleError
from ..variants import inits

if TYPE_CHECKING:
    from .rule import Rule


KASA_DEFAULTS = (1e-4, 1e-3)  # PEFT's KasaConfig: beta, gamma


def kasa_field(rule: Rule) -> tuple[float, float]:
    value = KASA_DEFAULTS if rule.kasa is True else rule.kasa
    if isinstance(value, dict):
        value = (value.get("beta", KASA_DEFAULTS[0]), value.get("gamma", KASA_DEFAULTS[1]))
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in value)
    if not ok:
        raise RuleError(f"Rule {rule.label}: kasa must be True or (beta, gamma) with finite beta, gamma >= 0, got "
                        f"{rule.kasa!r}.")
    if rule.use_dora or rule.lora_bias or rule.out_slices or rule.block_diagonal or inits.is_weight_init(rule.init) \
            or rule.init in ("mica", "orthogonal"):
        raise RuleError(f"Rule {rule.label}: KaSA truncates W and adds a learned diagonal between A and B; drop "
                        "DoRA, lora_bias, out_slices, block_diagonal or the init from W (PEFT has no such mix).")
    return float(value[0]), float(value[1])


VELORA_DEFAULTS = (64, 1.0, "batch_average")  # PEFT's VeloraConfig: num_groups, scale, init_type
VELORA_INITS = ("batch_average", "batch_average_once", "random")


def velora_field(rule: Rule) -> tuple[int, float, str]:
    value = VELORA_DEFAULTS if rule.velora is True else rule.velora
    if isinstance(value, dict):
        value = tuple(value.get(k, d) for k, d in zip(("num_groups", "scale", "init_type"), VELORA_DEFAULTS))
    ok = isinstance(value, (tuple, list)) and len(value) == 3
    groups, scale, init = value if ok else (None, None, None)
    if not (ok and isinstance(groups, int) and not isinstance(groups, bool) and groups > 0
            and isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
            and init in VELORA_INITS):
        raise RuleError(f"Rule {rule.label}: velora must be True or (num_groups > 0, scale > 0, init_type in "
                        f"{VELORA_INITS}), got {rule.velora!r}.")
    if rule.use_dora or rule.lora_bias or rule.out_slices or rule.block_diagonal or inits.is_weight_init(rule.init) \
            or rule.init == "mica":
        raise RuleError(f"Rule {rule.label}: VeLoRA is plain LoRA with a compressed backward; drop DoRA, lora_bias, "
                        "out_slices, block_diagonal or the init from W (PEFT has no such mix).")
    return groups, float(scale), init


def loftq_field(rule: Rule) -> tuple[int, int]:
    value = rule.loftq if rule.loftq is not None else (4, 1)
    if isinstance(value, dict):
        value = (value.get("loftq_bits", 4), value.get("loftq_iter", 1))
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or value[0] not in (4, 8) or value[1] < 1:
        raise RuleError(f"Rule {rule.label}: loftq must be (bits in (4, 8), iterations >= 1), got {rule.loftq!r}.")
    if rule.use_dora or rule.lora_bias or rule.out_slices or rule.block_diagonal or rule.kasa or rule.velora:
        raise RuleError(f"Rule {rule.label}: init='loftq' is plain LoRA from W's quantization error; drop DoRA, "
                        "lora_bias, out_slices, block_diagonal, KaSA or VeLoRA.")
    return int(value[0]), int(value[1])


LORA_GA_DEFAULTS = ("ArB2r", "stable", 16)  # PEFT's LoraGAConfig: direction, scale, stable_gamma
LORA_GA_CHOICES = (("ArBr", "A2rBr", "ArB2r", "random"), ("stable", "weight_svd", "gd_scale", "unit"))


def lora_ga_field(rule: Rule) -> tuple[str, str, int]:
    value = rule.lora_ga if rule.lora_ga is not None else LORA_GA_DEFAULTS
    if isinstance(value, dict):
        value = tuple(value.get(k, d) for k, d in zip(("direction", "scale", "stable_gamma"), LORA_GA_DEFAULTS))
    ok = isinstance(value, (tuple, list)) and len(value) == 3
    direction, scale, gamma = value if ok else (None, None, None)
    if not (ok and direction in LORA_GA_CHOICES[0] and scale in LORA_GA_CHOICES[1] and isinstance(gamma, (int, float))
            and not isinstance(gamma, bool) and gamma > 0):
        raise RuleError(f"Rule {rule.label}: lora_ga must be (direction in {LORA_GA_CHOICES[0]}, scale in "
                        f"{LORA_GA_CHOICES[1]}, stable_gamma > 0), got {rule.lora_ga!r}.")
    if rule.use_dora or rule.lora_bias or rule.out_slices or rule.block_diagonal or rule.kasa or rule.velora:
        raise RuleError(f"Rule {rule.label}: init='lora_ga' is plain LoRA from the weight's gradient; drop DoRA, "
                        "lora_bias, out_slices, block_diagonal, KaSA or VeLoRA.")
    return direction, scale, gamma


def corda_field(rule: Rule) -> str:
    value = rule.corda if rule.corda is not None else "ipm"
    if isinstance(value, dict):
        value = value.get("corda_method") or "ipm"
    if value not in ("ipm", "kpm"):
        raise RuleError(f"Rule {rule.label}: corda must be 'ipm' or 'kpm', got {rule.corda!r}.")
    if rule.use_dora or rule.lora_bias or rule.out_slices or rule.block_diagonal or rule.kasa or rule.velora:
        raise RuleError(f"Rule {rule.label}: init='corda' is plain LoRA from W and its inputs' covariance; drop "
                        "DoRA, lora_bias, out_slices, block_diagonal, KaSA or VeLoRA.")
    return value


MONTECLORA_DEFAULTS = {"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
                       "kl_loss_weight": 1e-5, "buffer_size": 150}  # PEFT's MontecloraConfig


def monteclora_field(rule: Rule) -> tuple:
    value = {} if rule.monteclora is True else rule.monteclora
    if isinstance(value, (tuple, list)) and len(value) == len(MONTECLORA_DEFAULTS):
        value = dict(zip(MONTECLORA_DEFAULTS, value))
    if not isinstance(value, dict) or set(value) - set(MONTECLORA_DEFAULTS):
        raise RuleError(f"Rule {rule.label}: monteclora must be True or a dict of {sorted(MONTECLORA_DEFAULTS)}, got "
                        f"{rule.monteclora!r}.")
    v = {**MONTECLORA_DEFAULTS, **value}
    if not (isinstance(v["num_samples"], int) and v["num_samples"] > 0 and isinstance(v["buffer_size"], int)
            and v["buffer_size"] > 0 and v["dirichlet_prior"] > 0 and isinstance(v["use_entropy"], bool)):
        raise RuleError(f"Rule {rule.label}: monteclora needs num_samples > 0, buffer_size > 0, dirichlet_prior > 0 "
                        f"and a bool use_entropy, got {v}.")
    if rule.use_dora or rule.lora_bias or rule.out_slices or rule.block_diagonal:
        raise RuleError(f"Rule {rule.label}: MonteCLoRA samples A itself; drop DoRA, lora_bias, out_slices or "
                        "block_diagonal.")
    return tuple(v[k] for k in MONTECLORA_DEFAULTS)


QALORA_DEFAULT = 16  # PEFT's qalora_group_size


def qalora_field(rule: Rule) -> int:
    value = QALORA_DEFAULT if rule.qalora is True else rule.qalora
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RuleError(f"Rule {rule.label}: qalora must be True or the pooling group size (an int >= 1), got "
                        f"{rule.qalora!r}.")
    if rule.use_dora or rule.lora_bias or rule.out_slices or rule.block_diagonal or inits.is_weight_init(rule.init) \
            or rule.init not in (True, False, "default", "gaussian"):
        raise RuleError(f"Rule {rule.label}: QA-LoRA pools the input before A, a fresh [r, in/g] factor; drop DoRA, "
                        "lora_bias, out_slices, block_diagonal or the init (PEFT refuses DoRA with it and draws A "
                        "anew).")
    return value
