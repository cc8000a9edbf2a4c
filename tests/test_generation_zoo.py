"""The generation zoo (a sliding-window model in its default config, a state-space model, two hybrids, three
encoder-decoders) through every feature against PEFT 0.21: forward, gradients, merge, checkpoints both ways, and
generation (greedy, a left-padded batch, beam search, a streamer receiving the tokens)."""

import warnings

import pytest
import torch
from helpers import peft_twin, rel_err
from peft import PeftModel
from transformers.generation.streamers import BaseStreamer
from zoo import GENERATION_ZOO, output_tensor

import lora_fx
from lora_fx import Rule

FALLBACK = {"mamba", "jamba", "lfm2"}  # their caches are not static: the model's own generate runs the adapters


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.tokens = []

    def put(self, value):
        self.tokens.append(value.clone())

    def end(self):
        self.tokens.append(None)


def _left_padded(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", list(GENERATION_ZOO))
def test_generation_zoo_equals_peft(name, tmp_path):
    c = GENERATION_ZOO[name]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, alpha=8, init=False), **c.lorafy_kwargs())
    pm = peft_twin(c, lm, r=4, lora_alpha=8)
    args, kwargs = c.inputs(), c.call_kwargs()
    outs = [output_tensor(m(*args, **kwargs)) for m in (lm, pm)]
    assert rel_err(outs[0], outs[1]) < 1e-5
    assert rel_err(outs[0], output_tensor(c.build()(*args, **kwargs))) > 1e-4  # the adapters act
    for out in outs:
        out.square().mean().backward()
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        assert rel_err(unit.lora_A.grad, layer.lora_A["default"].weight.grad) < 1e-4, key
        assert rel_err(unit.lora_B.grad, layer.lora_B["default"].weight.grad) < 1e-4, key
    lm.save_pretrained(tmp_path / "mine")
    back = PeftModel.from_pretrained(c.build(), tmp_path / "mine").eval()
    with torch.no_grad():
        assert rel_err(output_tensor(back.base_model(*args, **kwargs)), outs[1]) < 1e-5  # Whisper: not input_ids
        lm.merge()
        assert rel_err(output_tensor(lm(*args, **kwargs)), outs[1]) < 1e-5
        lm.unmerge()
    prompt = c.generate_kwargs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = [({}, {}), ({"num_beams": 2}, {})]
        if not c.kwargs_fn:  # decoder-only
            ids, mask = _left_padded(prompt["input_ids"])
            runs.append(({"pad_token_id": 0}, {"input_ids": ids, "attention_mask": mask}))
        for extra, given in runs:
            call = {**prompt, **given, **extra, "max_new_tokens": 6}
            assert torch.equal(lm.generate(**call), pm.generate(**call, do_sample=False)), (name, extra)
        streams = [Collect(), Collect()]
        lm.generate(**prompt, max_new_tokens=4, streamer=streams[0])
        pm.generate(**prompt, max_new_tokens=4, do_sample=False, streamer=streams[1])
    assert len(streams[0].tokens) == len(streams[1].tokens) and streams[0].tokens[-1] is None
    assert all(torch.equal(a, b) for a, b in zip(streams[0].tokens[:-1], streams[1].tokens[:-1]))
    said = [w for w in caught if "static-cache graphs cannot run" in str(w.message)]
    assert len(said) == (name in FALLBACK)  # once per model, for the families that fall back
