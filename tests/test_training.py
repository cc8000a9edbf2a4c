"""Training in the ecosystem: the model's own calling convention and loss, PEFT's interface, Hugging Face
Trainer and TRL's SFTTrainer with default settings (PEFT adapter checkpoints, resume, PEFT's losses)."""

import inspect
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lora_fx
from lora_fx import AdapterError

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96, **kw)).eval()


def _lm(model, fuse=True):
    return lora_fx.lorafy(model, LoraConfig(**CONFIG, init_lora_weights=False), fuse=fuse,
                          example_inputs=(torch.randint(0, 96, (2, 8)),))


def test_forward_takes_the_models_arguments_and_computes_its_loss(tmp_path):
    model = _llama()
    lm = _lm(model)
    assert inspect.signature(lm.forward) == inspect.signature(model.forward)
    ids, labels = torch.randint(0, 96, (3, 10)), torch.randint(0, 96, (3, 10))
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = lm(input_ids=ids, attention_mask=mask, labels=labels)  # captured with input_ids only
    lm.save_pretrained(tmp_path)
    ref = PeftModel.from_pretrained(_llama(), tmp_path)(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, ref.loss, rtol=1e-6) and torch.allclose(out.logits, ref.logits, atol=1e-6)
    n_programs = len(lm.derived_graphs)
    half = lm(ids, attention_mask=mask, labels=labels, num_items_in_batch=7).loss
    double = lm(ids, attention_mask=mask, labels=labels, num_items_in_batch=14).loss  # no new capture
    assert torch.allclose(half, 2 * double) and len(lm.derived_graphs) == n_programs + 1
    assert torch.equal(lm(ids).logits, lm(input_ids=ids).logits)  # by position or by name


def test_an_argument_the_model_does_not_take_is_named():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x, scale=None):
            return self.fc(x) if scale is None else self.fc(x) * scale

    model, x = Plain(), torch.randn(2, 8)
    lm = lora_fx.lorafy(model, ["fc"], example_inputs=(x,))
    assert torch.equal(lm(x, scale=torch.tensor(2.0)), model(x, scale=torch.tensor(2.0)))  # a new combination
    with pytest.raises(lora_fx.CaptureError, match="no parameter 'bogus'.*x, scale"):
        lm(torch.randn(2, 8), bogus=1)


def test_other_signatures_share_the_blocks_and_the_store():
    lm = _lm(_llama())
    ids = torch.randint(0, 96, (2, 9))
    lm(input_ids=ids, labels=ids)
    block = lm.blocks["model.layers.0"]
    assert set(block.programs) == {"", "call1"}
    opt = torch.optim.SGD(lm.trainable_parameters(), lr=1.0)
    before = lm(input_ids=ids, labels=ids).loss
    before.backward()
    opt.step()
    assert lm(input_ids=ids, labels=ids).loss < before  # the step reached the graph of this signature too


def test_the_lora_model_stands_in_for_a_peft_model():
    model = _llama()
    lm = _lm(model)
    assert isinstance(lm, PeftModel) and isinstance(lm, lora_fx.LoraModel)
    assert lm.peft_config["default"].r == 4 and lm.active_adapter == "default"
    assert lm.get_base_model() is model and lm.config is model.config
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad(), lm.disable_adapter():
        assert torch.equal(lm(ids).logits, model(ids).logits)
    assert not torch.equal(lm(ids).logits, model(ids).logits)
    with pytest.raises(AdapterError, match="internal to PEFT"):
        lm.get_layer_status()


def _dataset(n=32):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (torch.arange(12) + int(torch.randint(0, 96, (1,), generator=g))).remainder(96).tolist()}
            for _ in range(n)]
    return Dataset.from_list([{**r, "labels": list(r["input_ids"]), "text": "unused"} for r in rows])


def _train(model, out, resume=None, max_steps=8):
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(0)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps,
                             logging_steps=1, save_steps=4, report_to=[], use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_with_defaults_matches_peft_and_checkpoints_adapters(tmp_path):
    from transformers import set_seed

    set_seed(0)
    peft_model = get_peft_model(_llama(), LoraConfig(**CONFIG))
    _, peft_losses = _train(peft_model, tmp_path / "peft")
    set_seed(0)
    lm = lora_fx.lorafy(_llama(), LoraConfig(**CONFIG), example_inputs=(torch.randint(0, 96, (2, 8)),))
    trainer, losses = _train(lm, tmp_path / "ours")
    assert torch.allclose(torch.tensor(losses), torch.tensor(peft_losses), rtol=1e-4)  # same seed, same losses
    checkpoint = tmp_path / "ours" / "checkpoint-4"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert not any(name.startswith("model") for name in os.listdir(checkpoint))  # an adapter, not the model
    (tmp_path / "ours" / "checkpoint-8").rename(tmp_path / "ours" / "later")
    set_seed(0)
    again = lora_fx.lorafy(_llama(), LoraConfig(**CONFIG), example_inputs=(torch.randint(0, 96, (2, 8)),))
    _, resumed = _train(again, tmp_path / "ours", resume=str(checkpoint))
    assert resumed[4:] == losses[4:]
    trainer.save_model(str(tmp_path / "saved"))
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        back = PeftModel.from_pretrained(_llama(), str(tmp_path / "saved"))
        assert torch.allclose(back(ids).logits, lm(ids).logits, atol=1e-6)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(90)} | {"<pad>": 90, "<eos>": 91, "<unk>": 92}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_trl_sft_trainer_trains_and_checkpoints_adapters(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = [" ".join(f"w{(s + i) % 90}" for i in range(10)) for s in range(24)]
    lm = lora_fx.lorafy(_llama(pad_token_id=90, eos_token_id=91), LoraConfig(**CONFIG),
                        example_inputs=(torch.randint(0, 90, (2, 8)),))
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, logging_steps=1,
                     report_to=[], use_cpu=True, save_steps=3)
    trainer = SFTTrainer(model=lm, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                         processing_class=_tokenizer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "checkpoint-6"))
    assert any(u.lora_B.abs().sum() > 0 for _, u in lm.adapters.iter_units())  # the adapters trained


def test_a_replaced_forward_must_not_skip_adapters_outside_the_backbone():
    model = _llama()
    lm = lora_fx.lorafy(model, ["q_proj", "lm_head"], example_inputs=(torch.randint(0, 96, (2, 8)),))
    model.forward = lambda *a, **k: type(model).forward(model, *a, **k)  # as TRL patches in its fused head
    with pytest.raises(AdapterError, match="lm_head"):
        lm(torch.randint(0, 96, (2, 8)))
