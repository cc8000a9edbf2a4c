"""What ``merge_and_unload()`` / ``unload()`` return: the graph module (for ``torch.compile`` and ``torch.export``),
which also answers what PEFT's returned model answers: ``save_pretrained``, ``generate``, ``config`` and the other
attributes of the wrapped Hugging Face model (whose parameters the graph shares, so they hold the same weights).

Example::

    merged = lm.merge_and_unload()
    merged.save_pretrained("merged")         # AutoModelForCausalLM.from_pretrained("merged") loads it
    merged.generate(ids, max_new_tokens=8)   # the wrapped model's generate, on the merged weights
"""

from __future__ import annotations

import functools
from typing import Any

from torch import fx, nn

PASSED_ON = ("config", "generation_config", "name_or_path", "main_input_name", "base_model_prefix")
METHODS = ("save_pretrained", "generate", "can_generate", "get_input_embeddings", "get_output_embeddings",
           "push_to_hub")


def serve_like(gm: fx.GraphModule, source: nn.Module, untied: bool) -> fx.GraphModule:
    """Give ``gm`` the wrapped model's attributes and methods that PEFT users call on a merged model.
    ``untied``: a merge broke a tie (a targeted tied embedding), so saving unties it in the saved config too."""
    for name in PASSED_ON:
        if hasattr(source, name):
            object.__setattr__(gm, name, getattr(source, name))
    for name in METHODS:
        if callable(getattr(source, name, None)):
            object.__setattr__(gm, name, getattr(source, name))
    if callable(getattr(source, "save_pretrained", None)):
        object.__setattr__(gm, "save_pretrained", functools.partial(_save, source, untied))
    return gm


def _save(source: nn.Module, untied: bool, *args: Any, **kwargs: Any) -> Any:
    config = getattr(source, "config", None)
    if untied and config is not None:
        config.tie_word_embeddings = False  # the merged head has its own weight now
    return source.save_pretrained(*args, **kwargs)
