"""Error types. Every message names the culprit (rule, key, file, shape) and says what to do."""

from __future__ import annotations


class LoraFxError(Exception):
    """Base class of every error lora_fx raises on purpose."""


class RuleError(LoraFxError, ValueError):
    """A rule is malformed, matches nothing, or matches a node lora_fx cannot adapt."""


class CaptureError(LoraFxError, TypeError):
    """The model could not be captured as a graph."""


class AdapterError(LoraFxError, ValueError):
    """An adapter name or adapter state is wrong (unknown name, already merged, ...)."""


class CheckpointError(LoraFxError, ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


class MergeError(LoraFxError, ValueError):
    """A merge or unmerge cannot be done (non-finite result, nothing merged, ...)."""


class RuleWarning(UserWarning):
    """A rule entry matched nothing (likely a typo), or a rule asks for something that adds nothing."""


class PassError(LoraFxError, RuntimeError):
    """A graph pass failed on a graph it was given (a bug in lora_fx: the message names the pass and graph)."""


def preview(items, n: int = 8) -> str:
    """``'a', 'b', ... (+3 more)``: a short list for error messages."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
