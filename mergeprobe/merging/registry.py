"""The one registry of merge methods: name → class.

Example
-------
>>> from mergeprobe.merging.registry import available_methods, get_method
>>> "ties" in available_methods()
True
>>> get_method("ties", density=0.5).density
0.5
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from mergeprobe.errors import MergeError
from mergeprobe.merging.base import MergeMethod

_METHODS: dict[str, type[MergeMethod]] = {}
M = TypeVar("M", bound=type[MergeMethod])


def register(cls: M) -> M:
    """Class decorator: make a :class:`MergeMethod` available under ``cls.name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise MergeError(f"merge method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method.
    import mergeprobe.merging.methods  # noqa: F401


def available_methods() -> list[str]:
    """Names of every registered merge method.

    >>> "pico" in available_methods() and "tada" in available_methods()
    True
    """
    _load_builtin_methods()
    return sorted(_METHODS)


def method_class(name: str) -> type[MergeMethod]:
    """The class registered under ``name``."""
    _load_builtin_methods()
    if name not in _METHODS:
        raise MergeError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def get_method(name: str, **params: Any) -> MergeMethod:
    """Instantiate method ``name`` with ``params``; unknown parameters are a clear error."""
    cls = method_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise MergeError(
            f"merge method {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'none'}."
        )
    return cls(**params)
