"""lm.generate with transformers' own arguments: the model's own generate runs with the active adapters added to its
layers as PEFT adds them, so tokens (beam search included), scores and streamed tokens equal PEFT's generate with
the same arguments; what cannot run there is refused. Encoder-decoders and state-space models: test_generation_zoo."""


import pytest
import torch
from helpers import peft_twin, rel_err
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
