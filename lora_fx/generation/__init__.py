"""Generation with adapters: one graph over a static KV cache, derived from the LoraModel's state like every other
graph (``generate``), the decode loop and the package runner (``loop``), the model's own generate with the adapters
attached (``eager``), and token choice from logits (``sampling``)."""
