"""Documentation that runs: every docstring example in the library passes, every public name has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import mergeprobe

MODULES = sorted(m.name for m in pkgutil.walk_packages(mergeprobe.__path__, "mergeprobe.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"


def test_every_public_name_is_documented_with_an_example():
    missing = []
    for name in mergeprobe.__all__:
        obj = getattr(mergeprobe, name)
        if not callable(obj):  # __version__ and other data
            continue
        doc = inspect.getdoc(obj) or ""
        # Error classes share the example of their base, MergeProbeError.
        is_error = inspect.isclass(obj) and issubclass(obj, mergeprobe.MergeProbeError) and obj is not mergeprobe.MergeProbeError
        if not doc or (not is_error and ">>>" not in doc):
            missing.append(name)
    assert not missing, f"public names without a docstring example: {missing}"
