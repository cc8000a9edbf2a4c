"""Mixture-of-experts models for the expert-parameter tests: tiny configs of transformers 5's MoE families (3-D
expert stacks) and hand-written modules that use their weights as a Python loop (``W[e]``) or as a 2-D parameter
(PEFT's ``MlpUsingParameters``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, head_dim=16)


def hf_moe(family: str, experts: int = 4) -> nn.Module:
    """A tiny causal LM of ``family`` with ``experts`` experts per layer, top-2 routing, in eval mode."""
    import transformers as tf

    specs = {
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                      dict(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=32)),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                    dict(num_local_experts=experts, num_experts_per_tok=2, sliding_window=None)),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=experts, num_experts_per_tok=2,
                                                              pad_token_id=0, eos_token_id=1, bos_token_id=2)),
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                    dict(num_local_experts=experts, num_experts_per_tok=2, layer_types=["full_attention"] * 2)),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                      dict(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32)),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                        dict(n_routed_experts=max(experts, 8), num_experts_per_tok=2, moe_intermediate_size=32,
                             first_k_dense_replace=0, n_group=2, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                             num_key_value_heads=4)),
    }
    config_cls, model_cls, extra = specs[family]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls(config_cls(**{**COMMON, **extra}))
    return model.eval()


ATTENTION = {"deepseek_v3": "kv_a_proj_with_mqa"}  # a linear target beside the experts, per family


class LoopExperts(nn.Module):
    """Experts as a Python loop over a 3-D stack, ``F.linear(x, W[e])`` (symbolic_trace unrolls it), each token
    weighted by a soft router (dense, so the loop has no data-dependent branch)."""

    def __init__(self, experts: int = 3, dim: int = 12, hidden: int = 20) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, dim) / dim**0.5)
        self.w_out = nn.Parameter(torch.randn(experts, dim, hidden) / hidden**0.5)
        self.experts = experts

    def forward(self, x):
        gates = torch.softmax(self.router(x), dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.experts):
            h = F.gelu(F.linear(x, self.w_in[e]))
            out = out + gates[..., e : e + 1] * F.linear(h, self.w_out[e])
        return out


class _LinearUsingParameter(nn.Module):
    """PEFT's test layer: ``x @ W + b`` with W stored ``[in, out]``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    """PEFT's ``MlpUsingParameters``: layers whose weights only ``target_parameters`` reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20)
        self.lin1 = _LinearUsingParameter(20, 2)
        self.lin2 = nn.Linear(2, 4)

    def forward(self, x):
        return self.lin2(self.lin1(torch.relu(self.lin0(x))))


class LoopModel(nn.Module):
    """``LoopExperts`` between two linears (the experts' owner is a submodule, as PEFT's wrappers need)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 12)
        self.moe = LoopExperts()
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.moe(self.inp(x)))
