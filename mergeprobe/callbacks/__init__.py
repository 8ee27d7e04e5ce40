"""Hugging Face ``Trainer`` integration (a thin layer over :mod:`mergeprobe.probe`).

Example
-------
>>> from mergeprobe.callbacks import MergeProbeCallback
>>> callback = MergeProbeCallback("probe-store", run_name="math")
>>> callback.probe_fraction
0.03
"""

from mergeprobe.callbacks.merge_probe import MergeProbeCallback

__all__ = ["MergeProbeCallback"]
