"""lm.generate with transformers' own arguments, encoder-decoders and state-space models: the model's own
generate runs with the active adapters added to its layers as PEFT adds them, so tokens (beam search included),
scores and streamed tokens equal PEFT's generate with the same arguments; what cannot run there is refused."""

import copy
import warnings

import pytest
import torch
from helpers import peft_twin, rel_err
from peft import LoraConfig, get_peft_model
from zoo import ZOO

import lora_fx
from lora_fx import AdapterError, Rule


def _llama():
    c = ZOO["llama"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=8, init=False), **c.lorafy_kwargs()).eval()
    with torch.no_grad():
        for _, unit in lm.adapters.iter_units():
            unit.lora_B.mul_(3)
    return c, lm, peft_twin(c, lm, r=8).eval()


@pytest.mark.parametrize("kwargs", [
    dict(num_beams=4, max_new_tokens=10),
    dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=6, max_new_tokens=12),
    dict(num_beams=2, num_return_sequences=2, length_penalty=0.5, max_new_tokens=8),
], ids=["beams", "processors", "returns"])
def test_transformers_arguments_equal_peft(kwargs):
    c, lm, pm = _llama()
    ids = c.inputs()[0]
    ours = lm.generate(ids, pad_token_id=0, **kwargs)
    assert torch.equal(ours, pm.generate(input_ids=ids, pad_token_id=0, do_sample=False, **kwargs))
    assert not torch.equal(ours, c.build().generate(input_ids=ids, pad_token_id=0, do_sample=False, **kwargs))


def test_generation_config_scores_and_streamer_equal_peft():
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.clone())

        def end(self):
            self.tokens.append(None)

    c, lm, pm = _llama()
    ids = c.inputs()[0][:1]
    config = GenerationConfig(max_new_tokens=7, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    streams = [Collect(), Collect()]
    ours = lm.generate(ids, generation_config=config, streamer=streams[0])
    theirs = pm.generate(input_ids=ids, generation_config=config, streamer=streams[1])
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ours.scores, theirs.scores))
    assert len(streams[0].tokens) == len(streams[1].tokens) == 9 and streams[0].tokens[-1] is None
    assert all(torch.equal(a, b) for a, b in zip(streams[0].tokens[:-1], streams[1].tokens[:-1]))


def _twin(model, lm, targets):
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():
        for key, unit in lm.adapters.units("default").items():
            unit.lora_B.copy_(torch.randn(unit.lora_B.shape, generator=torch.Generator().manual_seed(1)))
            layer = pm.base_model.model.get_submodule(key)
            layer.lora_A["default"].weight.copy_(unit.lora_A)
            layer.lora_B["default"].weight.copy_(unit.lora_B)
    return pm


SRC = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(2))


def _encoder_decoder(name):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if name == "bart":
        cfg = BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=64)
        return BartForConditionalGeneration(cfg).eval(), ["q_proj", "v_proj"], dict(example_inputs=(SRC,))
    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval(), ["q", "v"], dict(
        example_kwargs={"input_ids": SRC, "decoder_input_ids": SRC[:, :3]})


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_encoder_decoders_generate_peft_tokens(name):
    model, targets, kwargs = _encoder_decoder(name)
    lm = lora_fx.lorafy(copy.deepcopy(model), Rule(targets, r=4, alpha=8), **kwargs).eval()
    pm = _twin(model, lm, targets)
    for extra in ({}, {"num_beams": 3}):
        ours = lm.generate(SRC, max_new_tokens=8, **extra)
        assert torch.equal(ours, pm.generate(input_ids=SRC, max_new_tokens=8, do_sample=False, **extra))
    assert not torch.equal(ours, model.generate(input_ids=SRC, max_new_tokens=8, num_beams=3, do_sample=False))
    with torch.no_grad():  # the captured forward still runs the adapters: teacher-forced logits equal PEFT's
        dec = SRC[:, :3]
        assert rel_err(lm(input_ids=SRC, decoder_input_ids=dec).logits,
                       pm(input_ids=SRC, decoder_input_ids=dec).logits) < 1e-5


def _recurrent(name):
    from transformers import JambaConfig, JambaForCausalLM, Lfm2Config, Lfm2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    if name == "mamba":
        return MambaForCausalLM(MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2)), [
            "in_proj", "x_proj"]
    if name == "jamba":
        return JambaForCausalLM(JambaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=1, num_experts=2, mamba_d_state=8, use_mamba_kernels=False)), ["q_proj", "v_proj"]
    return Lfm2ForCausalLM(Lfm2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      layer_types=["conv", "full_attention"])), ["q_proj", "v_proj"]


@pytest.mark.parametrize("name", ["mamba", "jamba", "lfm2"])
def test_state_space_and_hybrid_models_fall_back_to_their_own_generate(name):
    model, targets = _recurrent(name)
    model.eval()
    lm = lora_fx.lorafy(copy.deepcopy(model), Rule(targets, r=4, alpha=8), example_inputs=(SRC,)).eval()
    pm = _twin(model, lm, targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = lm.generate(SRC, max_new_tokens=8)
        lm.generate(SRC, max_new_tokens=8)
    assert torch.equal(ours, pm.generate(input_ids=SRC, max_new_tokens=8, do_sample=False))
    said = [w for w in caught if f"static-cache graphs cannot run {type(model).__name__}" in str(w.message)]
    assert len(said) == 1  # once per model


def test_whisper_generates_peft_tokens_from_audio_features():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=96, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=20,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)).eval()
    feats = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(3))
    lm = lora_fx.lorafy(copy.deepcopy(model), Rule(["q_proj", "v_proj"], r=4, alpha=8),
                        example_kwargs={"input_features": feats, "decoder_input_ids": SRC[:, :3]}).eval()
    pm = _twin(model, lm, ["q_proj", "v_proj"])
    ours = lm.generate(input_features=feats, max_new_tokens=6)
    assert torch.equal(ours, pm.generate(input_features=feats, max_new_tokens=6, do_sample=False))


def test_what_the_transformers_path_cannot_run_is_refused():
    c, lm, _ = _llama()
    ids = c.inputs()[0]
    unmerged = lm.generate(ids, num_beams=2, max_new_tokens=4, pad_token_id=0)
    lm.merge()  # merged adapters are in the weights: no hook adds them again
    assert torch.equal(lm.generate(ids, num_beams=2, max_new_tokens=4, pad_token_id=0), unmerged)
    lm.unmerge()
    lm.add_adapter("other", Rule(c.targets, r=2))
    with pytest.raises(AdapterError, match="adapter_names"):
        lm.generate(ids, adapter_names=["default", "other"], num_beams=2)
    dora = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, use_dora=True), **c.lorafy_kwargs()).eval()
    with pytest.raises(AdapterError, match="DoRA"):
        dora.generate(ids, num_beams=2, max_new_tokens=4)
    assert dora.generate(ids, max_new_tokens=4).shape == (ids.shape[0], ids.shape[1] + 4)  # the graph path runs
