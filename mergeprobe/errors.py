"""Exceptions raised by mergeprobe.

Every error names the offending input and says what to do about it, so that a
user reading only the message can fix the call.

Example
-------
>>> from mergeprobe.errors import AdapterError
>>> try:
...     raise AdapterError("adapter 'a/': NaN in 'q_proj'; retrain or drop it")
... except AdapterError as err:
...     print(type(err).__name__)
AdapterError
"""

from __future__ import annotations


class MergeProbeError(Exception):
    """Base class of every error mergeprobe raises on purpose; each subclass is also a
    ``ValueError``, ``OSError`` … where that is what it is, and its message names the
    input and the fix.

    Example
    -------
    >>> import mergeprobe
    >>> try:
    ...     mergeprobe.merge_adapters(["only-one"], method="linear")
    ... except mergeprobe.MergeProbeError as err:
    ...     print(type(err).__name__)
    MergeError
    """


class AdapterError(MergeProbeError, ValueError):
    """An adapter cannot be read, or adapters cannot be combined as asked."""


class UnsupportedAdapterError(AdapterError):
    """The adapter is valid PEFT, but of a kind mergeprobe does not merge (DoRA, non-LoRA)."""


class MergeError(MergeProbeError, ValueError):
    """A merge was asked for with inconsistent arguments."""


class OutputExistsError(MergeProbeError, FileExistsError):
    """The output directory exists and overwriting was not asked for."""


class StoreError(MergeProbeError, RuntimeError):
    """The probe store cannot be read or written."""


class SchemaVersionError(StoreError):
    """The probe store was written by an incompatible version of mergeprobe."""


class PredictorError(MergeProbeError, ValueError):
    """A predictor file or feature table cannot be used."""
