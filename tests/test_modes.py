"""Train and eval mode follow ``train()`` / ``eval()`` on exported graphs as they do in PEFT: dropout, BatchNorm
(batch statistics, running statistics updated) and ``self.training`` branches, whatever mode the model was
captured in; Trainer's evaluate is deterministic and equals PEFT's."""

import pytest
import torch
from helpers import rel_err
from peft import LoraConfig, PeftModel, get_peft_model
from peft_style import STYLES

import lora_fx


def _running_means(model):
    return [b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")]


@pytest.mark.parametrize("captured_in", ["eval", "train"])
def test_batchnorm_blocks_follow_the_mode_like_peft(captured_in, tmp_path):
    s = STYLES["bn_blocks"]
    x = s.inputs()
    model = s.build().train(captured_in == "train")
    lm = lora_fx.lorafy(model, lora_fx.Rule(["conv1", "conv2", "fc"], r=4, init=False), example_inputs=x)
    assert list(lm.blocks) == ["layer1.0", "layer1.1", "layer1.2"]
    lm.save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(s.build().train(captured_in == "train"), tmp_path, is_trainable=True)
    with torch.no_grad():
        assert rel_err(lm(*x), pm(*x)) < 1e-6  # before any train()/eval(): the base in its captured mode
        for mode in (True, False, True, False):
            lm.train(mode)
            pm.train(mode)
            assert rel_err(lm(*x), pm(*x)) < 1e-6
    for ours, theirs in zip(_running_means(model), _running_means(pm)):
        assert torch.allclose(ours, theirs)  # the training calls updated the model's own running statistics
    assert list(lm.blocks) == ["layer1.0", "layer1.1", "layer1.2"]


def test_a_model_captured_in_training_mode_evaluates_without_base_dropout():
    from zoo import ZOO

    c = ZOO["gpt2"]
    model = c.build_fn()  # a fresh Hugging Face model is in training mode, with dropout
    assert model.training
    ids = c.inputs()[0]
    lm = lora_fx.lorafy(model, ["c_attn"], example_inputs=(ids,))
    with torch.no_grad():
        assert not torch.equal(lm(ids).logits, lm(ids).logits)  # training: the base's dropout is active
        lm.eval()
        first = lm(ids).logits
        assert torch.equal(first, lm(ids).logits)
        assert rel_err(first, model.eval()(ids).logits) < 1e-6  # LoRA B is zero: the base model in eval


def _bert_classifier():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=96, max_position_embeddings=64, num_labels=3)
    return tf.BertForSequenceClassification(cfg)  # in training mode, hidden and attention dropout 0.1


def _classification_data(n=24):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"input_ids": torch.randint(2, 96, (10,), generator=g).tolist(),
                               "labels": int(torch.randint(0, 3, (), generator=g))} for _ in range(n)])


def _trainer(model, out):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             max_steps=4, logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no")
    data = _classification_data()
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)


def test_trainer_evaluate_is_deterministic_and_equals_peft(tmp_path):
    config = dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4, lora_dropout=0.1)
    lm = lora_fx.lorafy(_bert_classifier(), LoraConfig(**config), example_inputs=(torch.randint(2, 96, (2, 10)),))
    trainer = _trainer(lm, tmp_path / "ours")
    trainer.train()
    first, second = trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]
    assert first == second
    lm.save_pretrained(tmp_path / "adapter")  # the trained adapter (and the classifier head PEFT saves with it)
    pm = PeftModel.from_pretrained(_bert_classifier(), tmp_path / "adapter")
    theirs = _trainer(pm, tmp_path / "peft").evaluate()["eval_loss"]
    assert abs(first - theirs) < 1e-5 * abs(theirs)
    assert not lm.training and lm.base_mode is False  # evaluate() left it in eval, as it leaves PEFT


def test_peft_and_lora_fx_train_alike_from_training_mode(tmp_path):
    """Same seed, same data: the same losses with the base's dropout active in both."""
    config = dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4, lora_dropout=0.0)
    from transformers import set_seed

    set_seed(0)
    pm = get_peft_model(_bert_classifier(), LoraConfig(**config))
    peft_trainer = _trainer(pm, tmp_path / "peft")
    peft_trainer.train()
    set_seed(0)
    lm = lora_fx.lorafy(_bert_classifier(), LoraConfig(**config), example_inputs=(torch.randint(2, 96, (2, 10)),))
    trainer = _trainer(lm, tmp_path / "ours")
    trainer.train()
    theirs = [h["loss"] for h in peft_trainer.state.log_history if "loss" in h]
    ours = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert ours and torch.allclose(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4)
