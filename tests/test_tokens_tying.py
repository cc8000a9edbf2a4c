"""PEFT's trainable tokens, ensure_weight_tying and layer_replication, run both ways against PEFT: a PEFT
checkpoint loaded with ``from_peft`` gives PEFT's outputs, and lora_fx's checkpoint loads in PEFT with them."""

import pytest
import torch
from helpers import rel_err
from peft import LoraConfig, PeftModel, get_peft_model
from zoo import ZOO

import lora_fx


def _llama(tie: bool = False, layers: int = 2):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=tie)
    return tf.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
IDS[0, :3] = torch.tensor([3, 5, 7])  # rows with trainable tokens are read


def _perturbed(pm, names=("trainable_tokens_delta", "lora_B", "modules_to_save")):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(k in n for k in names):
                p.add_(torch.randn(p.shape, generator=gen))
    return pm


def _both_ways(build, config, tmp_path, inputs=(IDS,), capture=True):
    """(PEFT's outputs, lora_fx's from PEFT's checkpoint, PEFT's from lora_fx's checkpoint, the LoraModel)."""
    pm = _perturbed(get_peft_model(build(), LoraConfig(**config))).eval()
    with torch.no_grad():
        want = _out(pm(*inputs))
    pm.save_pretrained(tmp_path / "peft")
    kwargs = {"example_inputs": inputs} if capture else {}
    lm = lora_fx.from_peft(build(), tmp_path / "peft", **kwargs).eval()
    lm.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        return want, _out(lm(*inputs)), _out(back(*inputs)), lm


def _out(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("indices", [[3, 5, 7], {"embed_tokens": [3, 5], "lm_head": [3, 5]}], ids=["list", "dict"])
def test_trainable_tokens_equal_peft_both_ways(tie, indices, tmp_path):
    config = dict(target_modules=["q_proj"], trainable_token_indices=indices, r=4)
    want, ours, theirs, lm = _both_ways(lambda: _llama(tie), config, tmp_path)
    assert rel_err(ours, want) < 1e-6 and rel_err(theirs, want) < 1e-6
    assert "trainable tokens: rows [3, 5" in str(lm.report())
    params = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert any(n.endswith("tokens.model_embed_tokens.delta") for n in params)
    merged = lm.merge_and_unload()
    with torch.no_grad():
        assert rel_err(merged(IDS).logits, want) < 1e-5


def test_trainable_tokens_on_a_traced_model_and_in_generation(tmp_path):
    c = ZOO["embed"]
    config = dict(target_modules=["proj"], trainable_token_indices={"emb": [1, 2, 3]}, r=2)
    want, ours, theirs, _ = _both_ways(c.build, config, tmp_path, c.inputs(), capture=False)
    assert rel_err(ours, want) < 1e-6 and rel_err(theirs, want) < 1e-6
    g = ZOO["gpt2"]
    pm = _perturbed(get_peft_model(g.build(), LoraConfig(target_modules=["c_attn"], trainable_token_indices=[1, 2],
                                                         r=2))).eval()
    pm.save_pretrained(tmp_path / "gpt2")
    lm = lora_fx.from_peft(g.build(), tmp_path / "gpt2", example_inputs=g.inputs()).eval()
    prompt = g.inputs()[0][:1]
    assert torch.equal(lm.generate(prompt, max_new_tokens=6), pm.generate(input_ids=prompt, max_new_tokens=6,
                                                                          do_sample=False))


def test_trainable_tokens_train_only_their_rows():
    lm = lora_fx.lorafy(_llama(), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7], r=4),
                        example_inputs=(IDS,))
    before = lm.graph_module.get_parameter("model.embed_tokens.weight").detach().clone()
    lm(IDS, labels=IDS).loss.backward()
    delta = next(p for n, p in lm.named_parameters() if n.endswith("tokens.model_embed_tokens.delta"))
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert torch.equal(lm.graph_module.get_parameter("model.embed_tokens.weight"), before)


def test_trainable_tokens_bad_input_is_named():
    with pytest.raises(lora_fx.RuleError, match="nothing_here"):
        lora_fx.lorafy(_llama(), LoraConfig(target_modules=["q_proj"], trainable_token_indices={"nothing_here": [1]}),
                       example_inputs=(IDS,))
    with pytest.raises(lora_fx.RuleError, match=r"\[0, 96\)"):
        lora_fx.lorafy(_llama(), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 500]),
                       example_inputs=(IDS,))
    with pytest.raises(lora_fx.RuleError, match="different rows"):
        lora_fx.lorafy(_llama(tie=True), LoraConfig(target_modules=["q_proj"], trainable_token_indices={
            "embed_tokens": [3], "lm_head": [4]}), example_inputs=(IDS,))


def test_ensure_weight_tying_lora_on_a_tied_embedding(tmp_path):
    config = dict(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True, r=4, init_lora_weights=False)
    want, ours, theirs, lm = _both_ways(lambda: _llama(tie=True), config, tmp_path)
    assert rel_err(ours, want) < 1e-6 and rel_err(theirs, want) < 1e-6
    assert "ensure_weight_tying: lm_head reads model.embed_tokens" in str(lm.report())
    weight = lm.graph_module.get_parameter("model.embed_tokens.weight").detach().clone()
    with torch.no_grad():
        lm.merge()  # into the one tied weight: the head follows
        assert rel_err(lm(IDS).logits, want) < 1e-5
        lm.unmerge()
        assert torch.equal(lm.graph_module.get_parameter("model.embed_tokens.weight"), weight)


@pytest.mark.parametrize("ensure", [False, True])
def test_modules_to_save_on_a_tied_embedding(ensure, tmp_path):
    config = dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=ensure, r=4)
    want, ours, theirs, _ = _both_ways(lambda: _llama(tie=True), config, tmp_path)
    assert rel_err(ours, want) < 1e-6 and rel_err(theirs, want) < 1e-6


def test_layer_replication_equals_peft_and_merges(tmp_path):
    config = dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 3]], r=4)
    build = lambda: _llama(layers=3)  # noqa: E731
    want, ours, theirs, lm = _both_ways(build, config, tmp_path)
    assert rel_err(ours, want) < 1e-6 and rel_err(theirs, want) < 1e-6
    assert len(lm.get_base_model().model.layers) == 4
    assert "model.layers.2.self_attn.q_proj" in {t.key for t in lm.targets}
    with torch.no_grad():
        lm.merge()  # PEFT refuses; each copy's update goes to its own copy of the shared weight
        assert rel_err(lm(IDS).logits, want) < 1e-5
        lm.unmerge()
        assert torch.equal(lm(IDS).logits, ours)


def test_layer_replication_is_undone_when_lorafy_fails():
    model = _llama(layers=3)
    with pytest.raises(lora_fx.RuleError):
        lora_fx.lorafy(model, LoraConfig(target_modules=["nothing_here"], layer_replication=[[0, 2], [1, 3]]),
                       example_inputs=(IDS,))
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
