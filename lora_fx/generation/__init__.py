"""Generation with adapters: prefill and decode graphs over a static KV cache, derived from the LoraModel's state
like every other graph (``generate``), and token choice from logits (``sampling``)."""
