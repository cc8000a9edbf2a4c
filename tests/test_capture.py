"""Capture: attention masks built from sizes alone are elided (Hugging Face's eager path, bit for bit), masks that
read inputs are kept, example inputs that alias each other or are views are captured as distinct inputs."""

import pytest
import torch
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx.capture.masks import SDPA


def _attention_calls(lm):
    return [n for block in lm.blocks.values() for n in block.graph.nodes if n.target is SDPA]


@pytest.mark.parametrize("name,causal", [("llama", True), ("gpt2", True), ("bert", False)])
def test_size_only_masks_are_elided_and_outputs_match_eager_bitwise(name, causal):
    c = ZOO[name]
    model = c.build()
    lm = lora_fx.lorafy(model, c.targets, **c.lorafy_kwargs())
    calls = _attention_calls(lm)
    assert calls and all(n.args[3] is None and n.args[5] is causal for n in calls)
    other = c.other_inputs_fn()
    with torch.no_grad():
        assert torch.equal(output_tensor(lm(*other)), output_tensor(model(*other)))


def test_a_padding_mask_is_kept():
    c = ZOO["llama"]
    model = c.build()
    ids = torch.randint(0, 96, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    lm = lora_fx.lorafy(model, c.targets, example_kwargs={"input_ids": ids, "attention_mask": mask})
    assert all(n.args[3] is not None for n in _attention_calls(lm))
    mask2 = torch.ones(3, 11, dtype=torch.long)
    mask2[1, :5] = 0
    ids2 = torch.randint(0, 96, (3, 11))
    with torch.no_grad():
        ours = lm(input_ids=ids2, attention_mask=mask2).logits
        theirs = model(input_ids=ids2, attention_mask=mask2).logits
    assert torch.allclose(ours[mask2.bool()], theirs[mask2.bool()], atol=1e-5)


def test_aliased_example_inputs_become_distinct_graph_inputs():
    """labels=input_ids (the usual causal-LM idiom) must not merge the two inputs in the graph."""
    c = ZOO["llama"]
    model = c.build()
    ids = torch.randint(0, 96, (2, 8))
    lm = lora_fx.lorafy(model, c.targets, example_kwargs={"input_ids": ids, "labels": ids})
    ids2, labels2 = torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8))
    labels2[0, :3] = -100
    with torch.no_grad():
        ours, theirs = lm(input_ids=ids2, labels=labels2), model(input_ids=ids2, labels=labels2)
    assert torch.equal(ours.logits, theirs.logits) and torch.allclose(ours.loss, theirs.loss)


def test_a_view_as_example_input_does_not_pin_the_graph_to_it():
    c = ZOO["llama"]
    big = torch.randint(0, 96, (8, 40))
    lm = lora_fx.lorafy(c.build(), c.targets, example_inputs=(big[:2, :8],))
    with torch.no_grad():
        assert lm(torch.randint(0, 96, (3, 11))).logits.shape == (3, 11, 96)
