"""lm.generate: greedy tokens equal PEFT's (batch 1 and a left-padded batch), unmerged, merged, several adapters,
compiled; training seen with no re-capture; sampling; EOS per row; clear errors that leave the cache usable."""

import pytest
import torch
from helpers import peft_twin
from zoo import ZOO

import lora_fx
from lora_fx import AdapterError, Rule


def _lm(name, **rule):
    c = ZOO[name]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=8, init=False, **rule), **c.lorafy_kwargs())
    with torch.no_grad():
        for _, unit in lm.adapters.iter_units():
            unit.lora_B.mul_(3)  # adapters that change the tokens
    return c, lm


def _padded_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 96, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_greedy_tokens_equal_peft(name):
    c, lm = _lm(name)
    pm = peft_twin(c, lm, r=8)
    ids, mask = _padded_batch()
    for prompt, m in ((ids[1:2], None), (ids, mask)):
        ours = lm.generate(prompt, attention_mask=m, max_new_tokens=32, pad_token_id=0)
        theirs = pm.generate(input_ids=prompt, attention_mask=m, max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert torch.equal(ours, theirs)
    assert not torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=32, pad_token_id=0),
                           c.build().generate(input_ids=ids, attention_mask=mask, max_new_tokens=32,
                                              do_sample=False, pad_token_id=0))  # the adapter matters


def test_merged_and_several_active_adapters_generate_what_the_graph_computes():
    c, lm = _lm("llama")
    ids, mask = _padded_batch()
    unmerged = lm.generate(ids, attention_mask=mask, max_new_tokens=16)
    lm.merge()
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=16), unmerged)
    lm.unmerge()
    lm.add_adapter("b", Rule(["q_proj"], r=4, init=False))
    lm.set_adapter(["default", "b"])
    both = lm.generate(ids, attention_mask=mask, max_new_tokens=16)
    lm.merge()
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=16), both)
    assert not torch.equal(both, unmerged)


def _generation_graphs(lm):
    return {k: caps for k, caps in lm.derived_graphs.items() if k[0] == "generate"}


def test_a_training_step_is_seen_by_the_next_generate_without_recapture():
    c, lm = _lm("llama")
    ids = _padded_batch()[0][1:2]
    before = lm.generate(ids, max_new_tokens=16)
    graphs = _generation_graphs(lm)
    opt = torch.optim.SGD(lm.trainable_parameters(), lr=1.0)
    lm(ids).logits.sum().backward()
    opt.step()
    after = lm.generate(ids, max_new_tokens=16, pad_token_id=0)
    now = _generation_graphs(lm)
    assert now.keys() == graphs.keys() and all(a is b for k in graphs for a, b in zip(now[k], graphs[k]))
    assert not torch.equal(after, before)
    pm = peft_twin(c, lm, r=8)
    assert torch.equal(after, pm.generate(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=0))


def test_compiled_decode_is_compiled_once_and_reused():
    from torch._dynamo.utils import counters

    c, lm = _lm("llama")
    ids, mask = _padded_batch()
    eager = lm.generate(ids, attention_mask=mask, max_new_tokens=12)
    torch._dynamo.reset()
    counters.clear()
    lm.eval()
    lora_fx.compile(lm, backend="aot_eager")
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=12), eager)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # the prefill graph and the decode graph; 11 decode steps reuse one
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=12), eager)
    assert counters["stats"]["unique_graphs"] == graphs


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    c, lm = _lm("qwen2")
    ids = _padded_batch()[0][1:2]
    torch.manual_seed(0)
    a = lm.generate(ids, max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9)
    torch.manual_seed(0)
    b = lm.generate(ids, max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9)
    assert torch.equal(a, b)
    greedy = lm.generate(ids, max_new_tokens=16)
    assert torch.equal(lm.generate(ids, max_new_tokens=16, do_sample=True, top_k=1), greedy)


def test_rows_stop_at_eos_and_are_padded():
    c, lm = _lm("llama")
    ids, mask = _padded_batch()
    free = lm.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 7 + 2])  # row 0's third new token
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    first = (free[0, 7:] == eos).nonzero()[0].item()
    assert torch.equal(out[0, 7:8 + first], free[0, 7:8 + first]) and (out[0, 8 + first:] == 0).all()
    only = lm.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=10, eos_token_id=eos)
    assert only.shape[1] == 8 + first  # every row done: generation stops early


def test_bad_input_errors_name_the_limit_and_leave_the_cache_usable():
    c, lm = _lm("llama")
    ids = _padded_batch()[0][1:2]
    before = lm.generate(ids, max_new_tokens=8)
    with pytest.raises(AdapterError, match="max_position_embeddings \\(64\\)"):
        lm.generate(ids, max_new_tokens=60)
    with pytest.raises(AdapterError, match="attention_mask has shape"):
        lm.generate(ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(AdapterError, match="max_new_tokens"):
        lm.generate(ids, max_new_tokens=0)
    assert torch.equal(lm.generate(ids, max_new_tokens=8), before)
    with pytest.raises(AdapterError, match="causal language model"):
        lora_fx.lorafy(ZOO["bert"].build(), ["query"], **ZOO["bert"].lorafy_kwargs()).generate(ids)
    with pytest.raises(AdapterError, match="causal language model"):
        lora_fx.lorafy(ZOO["mlp"].build(), ["fc1"]).generate(ids)


def test_report_says_the_original_model_does_not_see_unmerged_adapters():
    _, lm = _lm("llama")
    assert "the original model's own generate() does not see unmerged adapters" in str(lm.report())


def test_a_short_sliding_window_generates_peft_tokens_within_it_and_past_it():
    """Within the window the static cache never slides: the graph's tokens equal PEFT's; past it lm.generate says
    so once and runs the model's own generate (its sliding cache) with the adapters attached: PEFT's tokens again.
    (Mistral's default 4096-token window: test_generation_zoo.)"""
    import copy
    import warnings

    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=256, sliding_window=24)).eval()
    ids, mask = _padded_batch()
    lm = lora_fx.lorafy(copy.deepcopy(model), Rule(["q_proj", "v_proj"], r=8, init=False), example_inputs=(ids,))
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for key, unit in lm.adapters.units("default").items():
            unit.lora_B.mul_(3)
            layer = pm.base_model.model.get_submodule(key)
            layer.lora_A["default"].weight.copy_(unit.lora_A)
            layer.lora_B["default"].weight.copy_(unit.lora_B)
    for new in (16, 40):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = lm.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0)
        theirs = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert torch.equal(ours, theirs), new
        said = [str(w.message) for w in caught if "window of 24 tokens" in str(w.message)]
        assert len(said) == (new == 40), said
    lm.build_adapter_bank()
    with pytest.raises(lora_fx.CaptureError, match="adapter_names .*window of 24 tokens"):  # they need the graph
        lm.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, adapter_names=["default"] * 4)


def test_every_batch_size_and_prompt_length_runs_in_one_captured_graph():
    """One graph per cache length serves every batch size and prompt length (and each decode step); a shorter
    generation runs in a longer cache already captured (down to half): PEFT's tokens, no new capture."""
    c, lm = _lm("llama")
    pm = peft_twin(c, lm, r=8)
    ids, mask = _padded_batch()
    lm.generate(ids, attention_mask=mask, max_new_tokens=50, pad_token_id=0)  # cache length 64
    keys = list(lm.derived_keys)
    assert keys == [("generate", 64)]
    for rows, prompt, new in ((3, 7, 50), (1, 7, 30), (4, 1, 16), (2, 5, 9)):
        given, m = ids[:rows, -prompt:], mask[:rows, -prompt:]
        ours = lm.generate(given, attention_mask=m, max_new_tokens=new, pad_token_id=0)
        theirs = pm.generate(input_ids=given, attention_mask=m, max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert torch.equal(ours, theirs), (rows, prompt, new)
    assert list(lm.derived_keys) == keys
