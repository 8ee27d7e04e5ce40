"""Merging LoRA adapters in core space: one registry, one module per method.

Example
-------
>>> from mergeprobe.merging import available_methods
>>> "linear" in available_methods()
True
"""

from mergeprobe.merging.api import MergeResult, check_compatible, merge_adapters
from mergeprobe.merging.base import MergeContext, MergeMethod, ModuleInputs, ModuleResult
from mergeprobe.merging.registry import available_methods, get_method, register

__all__ = [
    "MergeContext",
    "MergeMethod",
    "MergeResult",
    "ModuleInputs",
    "ModuleResult",
    "available_methods",
    "check_compatible",
    "get_method",
    "merge_adapters",
    "register",
]
