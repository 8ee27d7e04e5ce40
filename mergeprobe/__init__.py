"""mergeprobe: predict LoRA mergeability early in training, then merge adapters in core space.

The public API is re-exported here and imported lazily, so ``import mergeprobe`` stays
fast and pulls in neither ``transformers`` nor TensorBoard until they are used.

Example
-------
>>> import mergeprobe
>>> result = mergeprobe.merge_adapters(["math/", "code/"], method="pico", out_dir="merged")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LoraAdapter": "mergeprobe.adapters",
    "LoraModule": "mergeprobe.adapters",
    "load_adapter": "mergeprobe.adapters",
    "save_adapter": "mergeprobe.adapters",
    "CoreSpace": "mergeprobe.core",
    "ProbeStore": "mergeprobe.store",
    "RunRecord": "mergeprobe.store",
    "MergeResult": "mergeprobe.merging",
    "merge_adapters": "mergeprobe.merging",
    "available_methods": "mergeprobe.merging",
    "MergeProbeError": "mergeprobe.errors",
    "AdapterError": "mergeprobe.errors",
    "UnsupportedAdapterError": "mergeprobe.errors",
    "MergeError": "mergeprobe.errors",
    "OutputExistsError": "mergeprobe.errors",
    "StoreError": "mergeprobe.errors",
    "SchemaVersionError": "mergeprobe.errors",
    "PredictorError": "mergeprobe.errors",
    "MergeProbeCallback": "mergeprobe.callbacks",
    "MergeProbe": "mergeprobe.predictor",
    "PredictorProcess": "mergeprobe.predictor_process",
    "decide": "mergeprobe.decision",
    "Decision": "mergeprobe.decision",
    "DecisionThresholds": "mergeprobe.decision",
    "Router": "mergeprobe.routing",
    "RoutedModel": "mergeprobe.routing",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergeprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
