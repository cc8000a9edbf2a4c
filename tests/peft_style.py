"""PEFT-style small models (the shapes PEFT's own custom-model tests use: tiny feature sizes, grouped convs,
MultiheadAttention unbatched, as cross-attention and with other key/value sizes, repeated blocks with
BatchNorm, a CLIP-like two-tower model) with example inputs, for the drop-in tests run both ways with PEFT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.relu, self.drop, self.lin1 = nn.Linear(10, 20), nn.ReLU(), nn.Dropout(0.5), nn.Linear(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(self.drop(self.relu(self.lin0(x)))), dim=-1)


class EmbConv1D(nn.Module):
    """An embedding feeding transformers' Conv1D with one output feature (PEFT's default r=8 exceeds both)."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, ids):
        return self.lin0(torch.relu(self.conv1d(self.emb(ids))).flatten(1))


class GroupedConv(nn.Module):
    """A grouped conv (groups=8) and a depthwise one (groups = channels), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 16, 3, padding=1, groups=8)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.lin0 = nn.Linear(16, 2)

    def forward(self, x):  # x: [B, 16, H, W]
        return self.lin0(self.depthwise(torch.relu(self.conv2d(x))).mean((2, 3)))


class MhaUnbatched(nn.Module):
    """PEFT's MHA test model: a 2-D input, which nn.MultiheadAttention treats as one unbatched sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])


class MhaCross(nn.Module):
    """Cross-attention (query from x, key and value from y), batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 2)

    def forward(self, x, y):
        return self.lin0(self.mha(x, y, y)[0])


class MhaSelf(nn.Module):
    """Self-attention over a batched, sequence-first input."""

    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(16, 4), nn.Linear(16, 2)

    def forward(self, x):  # x: [T, B, E]
        return self.lin0(self.mha(x, x, x, need_weights=False)[0])


class MhaKdim(nn.Module):
    """Keys and values of other sizes than the queries: separate q/k/v projection weights."""

    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True), nn.Linear(16, 2)

    def forward(self, x, k, v):
        return self.lin0(self.mha(x, k, v)[0])


class BNBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class BNNet(nn.Module):
    """A ResNet-like stack: repeated blocks holding BatchNorm (buffers updated in training forwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(BNBlock(), BNBlock(), BNBlock())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.layer1(torch.relu(self.stem(x))).mean((2, 3)))


def clip() -> nn.Module:
    import transformers as tf

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


@dataclass
class Style:
    build_fn: Callable[[], nn.Module]
    inputs_fn: Callable[[], tuple]

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return self.build_fn().eval()

    def inputs(self) -> tuple:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return self.inputs_fn()


STYLES = {
    "mlp": Style(TinyMLP, lambda: (torch.randn(9, 10),)),
    "emb_conv1d": Style(EmbConv1D, lambda: (torch.randint(0, 100, (9, 10)),)),
    "grouped_conv": Style(GroupedConv, lambda: (torch.randn(2, 16, 5, 5),)),
    "mha_unbatched": Style(MhaUnbatched, lambda: (torch.randn(9, 10),)),
    "mha_cross": Style(MhaCross, lambda: (torch.randn(2, 5, 16), torch.randn(2, 7, 16))),
    "mha_self": Style(MhaSelf, lambda: (torch.randn(6, 2, 16),)),
    "mha_kdim": Style(MhaKdim, lambda: (torch.randn(2, 5, 16), torch.randn(2, 7, 8), torch.randn(2, 7, 12))),
    "bn_blocks": Style(BNNet, lambda: (torch.randn(2, 3, 8, 8),)),
    "clip": Style(clip, lambda: {"input_ids": torch.randint(2, 96, (2, 7)), "pixel_values": torch.randn(2, 3, 16, 16)}),
}
