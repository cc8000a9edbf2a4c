"""Adapters: units (one target's A, B and variant), the store holding every adapter, and weighted combinations."""

from .store import BANK, BASE, AdapterEntry, AdapterStore, adapter_dtype, check_adapter_name
from .unit import LoraUnit

__all__ = ["BANK", "BASE", "AdapterEntry", "AdapterStore", "LoraUnit", "adapter_dtype", "check_adapter_name"]
