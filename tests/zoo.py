"""The model zoo the tests run every feature through: tiny models built from configs, no downloads.

Each entry builds a fresh float32 model in eval mode (same seed, same weights every call) with example
inputs, the target names PEFT would use, and whether lorafy needs torch.export (example inputs) to capture it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 24, bias=False)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Functional(nn.Module):
    """Uses F.linear on its own parameters: module-swapping tools cannot target these."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(24, 12) / 4)
        self.b1 = nn.Parameter(torch.randn(24) / 4)
        self.w2 = nn.Parameter(torch.randn(6, 24) / 4)

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w1, self.b1)), self.w2)


class CNN(nn.Module):
    """Conv1d, Conv2d and Conv3d with stride and padding, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv3d(8, 8, (1, 3, 3), stride=(1, 2, 2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: [B, 3, L]
        h = torch.relu(self.c1(x))  # [B, 8, L/2]
        h = torch.relu(self.c2(h.unsqueeze(-1) * h.unsqueeze(-2)))  # [B, 8, L/2, L/2]
        h = self.c3(h.unsqueeze(2))  # [B, 8, 1, L/4, L/4]
        return self.head(h.mean((2, 3, 4)))


class EmbedModel(nn.Module):
    """An embedding (with a padding index) feeding a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16, padding_idx=0)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.emb(ids))).mean(1))


class FusedQKV(nn.Module):
    """One Linear for q, k and v with uneven parts (grouped-query attention: q 16, k 8, v 8), GPT-2/Falcon style."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 32)
        self.out = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # x: [B, T, 16]
        q, k, v = self.qkv(x).split([16, 8, 8], dim=-1)
        k, v = k.repeat(1, 1, 2), v.repeat(1, 1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1)
        return self.head(torch.tanh(self.out(att @ v)).mean(1))


class TLinear(nn.Linear):
    """An nn.Linear subclass computing ``x @ W.T`` itself (as Falcon's FalconLinear does)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class TransposedLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = TLinear(12, 24)
        self.fc2 = TLinear(24, 6, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _hf(name: str) -> nn.Module:
    import transformers as tf

    common = dict(vocab_size=96, max_position_embeddings=64)
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(cfg)
    if name == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        return tf.Qwen2ForCausalLM(cfg)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            **common)
        return tf.BertModel(cfg)
    raise KeyError(name)


def _generative(name: str) -> nn.Module:
    """The generation zoo's families: a sliding-window model in its default config, a state-space model, hybrids
    and encoder-decoders."""
    import transformers as tf

    attention = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=96)
    if name == "mistral":  # the default 4096-token sliding window
        return tf.MistralForCausalLM(tf.MistralConfig(max_position_embeddings=256, **attention))
    if name == "mamba":
        return tf.MambaForCausalLM(tf.MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2))
    if name == "jamba":
        return tf.JambaForCausalLM(tf.JambaConfig(
            attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
            mamba_d_state=8, use_mamba_kernels=False, **attention))
    if name == "lfm2":
        return tf.Lfm2ForCausalLM(tf.Lfm2Config(layer_types=["conv", "full_attention"], **attention))
    if name == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    if name == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                         num_heads=4, decoder_start_token_id=0))
    if name == "whisper":
        return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=96, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=20,
            max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1))
    raise KeyError(name)


@dataclass
class Case:
    name: str
    build_fn: Callable[[], nn.Module]
    inputs_fn: Callable[[], tuple]
    targets: list[str]  # PEFT target_modules
    export: bool  # lorafy needs example inputs (torch.export)
    peft: bool = True  # PEFT can adapt this model
    fan_in_fan_out: bool = False
    other_inputs_fn: Callable[[], tuple] | None = None  # another batch/sequence shape
    kwargs: dict[str, Any] = field(default_factory=dict)
    kwargs_fn: Callable[[], dict] | None = None  # keyword inputs of a forward (an encoder-decoder's decoder_input_ids)

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return self.build_fn().eval()

    def inputs(self) -> tuple:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return self.inputs_fn()

    def call_kwargs(self) -> dict[str, Any]:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return self.kwargs_fn() if self.kwargs_fn else {}

    def lorafy_kwargs(self) -> dict[str, Any]:
        if not self.export:
            return {}
        return {"example_kwargs": self.call_kwargs()} if self.kwargs_fn else {"example_inputs": self.inputs()}

    def generate_kwargs(self) -> dict[str, Any]:
        """What ``generate`` is given: the prompt ids, or an encoder-decoder's encoder inputs."""
        if self.kwargs_fn:
            return {k: v for k, v in self.call_kwargs().items() if not k.startswith("decoder_")}
        return {"input_ids": self.inputs()[0]}


def _ids(b: int, t: int) -> Callable[[], tuple]:
    return lambda: (torch.randint(0, 96, (b, t)),)


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (logits / last_hidden_state / the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


ZOO = {
    "mlp": Case("mlp", MLP, lambda: (torch.randn(4, 12),), ["fc1", "fc2", "head"], export=False,
                other_inputs_fn=lambda: (torch.randn(7, 12),)),
    "functional": Case("functional", Functional, lambda: (torch.randn(4, 12),), ["w1", "w2"], export=False,
                       peft=False, other_inputs_fn=lambda: (torch.randn(2, 12),)),
    "cnn": Case("cnn", CNN, lambda: (torch.randn(2, 3, 16),), ["c1", "c2", "c3", "head"], export=False,
                other_inputs_fn=lambda: (torch.randn(3, 3, 24),)),
    "embed": Case("embed", EmbedModel, lambda: (torch.randint(0, 40, (4, 7)),), ["emb", "proj", "head"],
                  export=False, other_inputs_fn=lambda: (torch.randint(0, 40, (2, 9)),)),
    "fused_qkv": Case("fused_qkv", FusedQKV, lambda: (torch.randn(2, 5, 16),), ["qkv", "out", "head"],
                      export=False, other_inputs_fn=lambda: (torch.randn(3, 4, 16),)),
    "transposed": Case("transposed", TransposedLinears, lambda: (torch.randn(4, 12),), ["fc1", "fc2"], export=False,
                       other_inputs_fn=lambda: (torch.randn(2, 12),)),
    "llama": Case("llama", lambda: _hf("llama"), _ids(2, 8),
                  ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], export=True,
                  other_inputs_fn=_ids(3, 11)),
    "qwen2": Case("qwen2", lambda: _hf("qwen2"), _ids(2, 8), ["q_proj", "k_proj", "v_proj", "o_proj"],
                  export=True, other_inputs_fn=_ids(1, 5)),
    "gpt2": Case("gpt2", lambda: _hf("gpt2"), _ids(2, 8), ["c_attn", "c_proj", "c_fc"], export=True,
                 fan_in_fan_out=True, other_inputs_fn=_ids(3, 6)),
    "bert": Case("bert", lambda: _hf("bert"), _ids(2, 8), ["word_embeddings", "query", "key", "value", "dense"],
                 export=True,
                 other_inputs_fn=_ids(1, 12)),
}


def _seq2seq(first: str, shape: tuple[int, ...]) -> Callable[[], dict]:
    def make() -> dict:
        encoder = torch.randn(*shape) if first == "input_features" else torch.randint(3, 96, shape)
        return {first: encoder, "decoder_input_ids": torch.randint(3, 96, (shape[0], 3))}
    return make


# The families lm.generate serves beyond the causal LMs above, each through forward, gradients, checkpoints, merge
# and generation against PEFT (tests/test_generation_zoo.py): every cache kind transformers has.
GENERATION_ZOO = {
    "mistral": Case("mistral", lambda: _generative("mistral"), _ids(2, 7), ["q_proj", "v_proj"], export=True),
    "mamba": Case("mamba", lambda: _generative("mamba"), _ids(2, 7), ["in_proj", "x_proj"], export=True),
    "jamba": Case("jamba", lambda: _generative("jamba"), _ids(2, 7), ["q_proj", "v_proj"], export=True),
    "lfm2": Case("lfm2", lambda: _generative("lfm2"), _ids(2, 7), ["q_proj", "v_proj"], export=True),
    "bart": Case("bart", lambda: _generative("bart"), tuple, ["q_proj", "v_proj"], export=True,
                 kwargs_fn=_seq2seq("input_ids", (2, 7))),
    "t5": Case("t5", lambda: _generative("t5"), tuple, ["q", "v"], export=True,
               kwargs_fn=_seq2seq("input_ids", (2, 7))),
    "whisper": Case("whisper", lambda: _generative("whisper"), tuple, ["q_proj", "v_proj"], export=True,
                    kwargs_fn=_seq2seq("input_features", (2, 16, 40))),
}
