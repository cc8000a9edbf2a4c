"""Rule semantics: plain names, globs, regexes, first match wins, excludes, kinds, PEFT configs."""

import pytest
from peft import LoraConfig

from lora_fx import Rule, RuleError
from lora_fx.rules import RuleSet, as_ruleset, match_pattern


@pytest.mark.parametrize("pattern,key,expected", [
    ("q_proj", "model.layers.0.self_attn.q_proj", True),
    ("q_proj", "q_proj", True),
    ("q_proj", "model.layers.0.self_attn.xq_proj", False),
    ("self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
    ("*.q_proj", "model.layers.0.self_attn.q_proj", True),
    ("model.layers.1.*", "model.layers.0.self_attn.q_proj", False),
    ("model.layers.[01].*_proj", "model.layers.1.mlp.up_proj", True),
    ("re:.*\\.(q|v)_proj", "model.layers.0.self_attn.v_proj", True),
    ("re:(q|v)_proj", "model.layers.0.self_attn.v_proj", False),  # full match, not search
])
def test_match_pattern(pattern, key, expected):
    assert match_pattern(pattern, key) is expected


def test_first_match_wins_and_exclude_stops():
    rs = as_ruleset([Rule("layers.0.q_proj", exclude=True), Rule("q_proj", r=16), Rule("*", r=2)])
    assert rs.decide("model.layers.0.q_proj", "linear").exclude
    assert rs.decide("model.layers.1.q_proj", "linear").r == 16
    assert rs.decide("model.layers.1.k_proj", "linear").r == 2


def test_kinds_restrict_matching():
    rule = Rule("*", kinds={"embedding"})
    assert not rule.matches("fc1", "linear") and rule.matches("emb", "embedding")
    assert Rule("fc1").matches("fc1", "conv")  # a plain name matches any kind, as in PEFT


def test_scaling_and_rslora():
    assert Rule("x", r=4, alpha=8).scaling == 2.0
    assert Rule("x", r=16, alpha=8, use_rslora=True).scaling == 2.0


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(alpha=float("nan")), "alpha must be a positive number"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(dropout=-0.1), "dropout must be in [0, 1)"),
    (dict(kinds={"lstm"}), "unknown kinds"),
    (dict(init="xavier"), "init must be one of"),
    (dict(loftq=(4, 1)), "pass init='loftq' too"),
])
def test_bad_rules_name_the_rule(kwargs, fragment):
    with pytest.raises(RuleError) as e:
        Rule("q_proj", **kwargs)
    assert fragment in str(e.value) and "q_proj" in str(e.value)


def test_bad_regex_and_bad_rule_types():
    with pytest.raises(RuleError, match="invalid regular expression"):
        Rule("re:(unclosed")
    with pytest.raises(RuleError, match="expected a Rule or a string"):
        as_ruleset(["fc1", 3])
    with pytest.raises(RuleError):
        as_ruleset([])


def test_lora_config_translation():
    rs = as_ruleset(LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                               exclude_modules=["layers.0.q_proj"], rank_pattern={"v_proj": 8},
                               alpha_pattern={"layers\\.1\\.q_proj": 2}))
    assert isinstance(rs, RuleSet)
    assert rs.decide("m.layers.0.q_proj", "linear").exclude
    rule = rs.decide("m.layers.1.q_proj", "linear")
    assert (rule.r, rule.alpha, rule.dropout) == (4, 16, 0.1)
    assert rs.effective(rule, "m.layers.1.q_proj").alpha == 2
    assert rs.effective(rs.decide("m.layers.1.v_proj", "linear"), "m.layers.1.v_proj").r == 8
    regex = as_ruleset(LoraConfig(target_modules=r".*\.q_proj"))
    assert regex.decide("m.layers.1.q_proj", "linear") and not regex.decide("m.q_proj.x", "linear")


@pytest.mark.parametrize("cfg,fragment", [
    (dict(target_modules=["q"], use_qalora=True, qalora_group_size=0), "qalora must be"),
    (dict(target_modules=["q"], arrow_config={"top_k": 1}), "create_arrow_model"),
    (dict(target_modules=None), "target_modules"),
])
def test_unsupported_lora_config_options_are_refused(cfg, fragment):
    with pytest.raises(RuleError, match=fragment):
        as_ruleset(LoraConfig(**cfg))


def test_layers_to_transform_follow_peft():
    rs = as_ruleset(LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"))
    assert rs.decide("model.layers.1.self_attn.q_proj", "linear") is not None
    assert rs.decide("model.layers.0.self_attn.q_proj", "linear") is None
    nested = as_ruleset(LoraConfig(target_modules=["w"], layers_to_transform=2))
    assert nested.decide("model.layers.2.experts.0.w", "linear") and not nested.decide("model.layers.0.experts.2.w",
                                                                                          "linear")


def test_all_linear_shorthand():
    rs = as_ruleset("all-linear")
    assert rs.exclude_output_layer and rs.decide("a.b", "linear") and not rs.decide("emb", "embedding")


def test_unsupported_init_in_adapter_config_is_refused():
    from lora_fx.peft.config import ruleset_from_peft_config

    with pytest.raises(RuleError, match="init_lora_weights='xavier'"):
        ruleset_from_peft_config({"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "xavier"})
