"""Hostile and malformed input, fuzzed with hypothesis.

Every case must end in one of two ways: the input is accepted (and then behaves), or
it is refused with one of mergeprobe's own errors (:class:`MergeProbeError`
subclasses). No other exception, nothing executed, and nothing written outside the
directory the caller chose: after each case the temporary directory's tree is checked.

- store metadata: ``meta.json``, ``store.json``, outcome files, pair files,
  ``result.json``, ``CLAIM`` and the ``signals.safetensors`` header;
- adapter configs (wrong types, huge ranks, negative alpha, missing keys) and
  ``adapter_model.safetensors`` headers (truncated, oversized header length, wrong
  dtype, shapes that claim more bytes than the file has);
- module keys and file names that try path traversal when an adapter is written;
- predictor files that are not skops, or that carry untrusted types.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mergeprobe import load_adapter, merge_adapters
from mergeprobe.adapters import adapter_from_state_dict, save_adapter
from mergeprobe.errors import AdapterError, MergeProbeError, PredictorError, StoreError
from mergeprobe.store import ProbeStore, check_name, merge_set_id
from tests.conftest import build_lora_model

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SLOW = settings(FUZZ, max_examples=25)

# ----------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10
)
deep_nesting = st.sampled_from([200, 5_000, 200_000]).map(lambda n: b"[" * n + b"]" * n)
odd_numbers = st.sampled_from([0, -1, -8, 1e-300, 1e308, 10**30, 2**64, float("nan"), float("inf"), -float("inf"), True, "8", [8], {"a": 1}])


def mutated_json(template: dict[str, Any], keys: list[str]) -> st.SearchStrategy[bytes]:
    """The template with some keys changed or dropped, any JSON value, raw bytes, a truncation or deep nesting."""
    text = json.dumps(template).encode()

    def mutate(changes: dict[str, Any], drops: set[str]) -> bytes:
        value = {k: v for k, v in template.items() if k not in drops}
        value.update(changes)
        return json.dumps(value).encode()

    return st.one_of(
        st.builds(mutate, st.dictionaries(st.sampled_from(keys), json_values | odd_numbers, max_size=3), st.sets(st.sampled_from(keys), max_size=2)),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.integers(0, len(text)).map(lambda k: text[:k]),
        deep_nesting,
    )


def safetensors_parts(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def safetensors_bytes(header: dict[str, Any], payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "Q99", "", "f32"]


@st.composite
def hostile_safetensors(draw: Any, data: bytes) -> bytes:
    """A safetensors file derived from ``data``: a lying header, a wrong length field, a wrong dtype, or truncated."""
    header, payload = safetensors_parts(data)
    kind = draw(st.sampled_from(["entry", "length", "truncate", "metadata", "junk_header"]))
    if kind == "length":
        text = json.dumps(header).encode()
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + text + payload
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "junk_header":
        return safetensors_bytes(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)), payload)
    if kind == "metadata":
        header["__metadata__"] = draw(json_values)
        return safetensors_bytes(header, payload)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
    if field == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(DTYPES))
    elif field == "shape":  # includes shapes that claim far more bytes than the file holds
        header[name]["shape"] = draw(st.lists(st.integers(-3, 10**12), max_size=3))
    elif field == "data_offsets":
        header[name]["data_offsets"] = draw(st.lists(st.integers(-3, 10**12), max_size=3))
    else:
        header[name] = draw(json_values)
    return safetensors_bytes(header, payload)


# ----------------------------------------------------------------- the directory-tree check


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (files with their content, directories as None)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return found


@contextmanager
def confined(name: str = "work") -> Iterator[Path]:
    """A fresh directory ``<tmp>/<name>`` for one case; afterwards nothing beside it may have appeared or changed.

    A sibling ``outside/`` holds a canary file; the case may write only under ``<tmp>/<name>``.
    """
    with tempfile.TemporaryDirectory(prefix="mergeprobe-fuzz-") as tmp:
        top = Path(tmp)
        (top / "outside").mkdir()
        (top / "outside" / "canary").write_text("untouched")
        work = top / name
        work.mkdir()
        before = tree(top / "outside")
        yield work
        assert sorted(p.name for p in top.iterdir()) == sorted(["outside", name]), "a file was written beside the chosen directory"
        assert tree(top / "outside") == before, "a file outside the chosen directory changed"


# ----------------------------------------------------------------- the probe store


@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one record, an outcome, stored pair features and a claimed, merged set."""
    root = tmp_path_factory.mktemp("template") / "store"
    store = ProbeStore(root)
    store.write_record("math", {"run_id": "r1", "base_model": "tiny", "status": "complete"}, {"x": torch.arange(6.0).reshape(2, 3), "ids": torch.arange(4)})
    store.record_outcome(["math", "code"], "ties", {"math": 0.9, "code": 0.8})
    store.write_pair_features("math", "code", {"update_alignment.mean": 0.1})
    set_id = merge_set_id(["math", "code"])
    assert store.claim_merge(set_id)
    store.mark_merged(set_id, {"method": "ties"})
    return root


def _store_file(root: Path, kind: str) -> Path:
    if kind == "outcome":
        return next((root / "outcomes").glob("*.json"))
    if kind == "pair":
        return next((root / "pairs").glob("*.json"))
    if kind in ("result.json", "CLAIM"):
        return next((root / "merges").iterdir()) / kind
    if kind == "store.json":
        return root / "store.json"
    return root / "runs" / "math" / kind


def _exercise_store(root: Path, kind: str) -> None:
    """Open, read everything, then write: only StoreError is allowed, and only where documented."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            store = ProbeStore(root)
        except StoreError:
            assert kind == "store.json"
            return
        names = store.runs()  # never raises: unreadable records are skipped with a warning
        store.runs(status="complete", base_model="tiny")
        assert set(names) <= {"math"}
        try:
            record = store.load("math")
        except StoreError:
            assert "math" not in names or kind == "signals.safetensors"
        else:
            for tensor in record.tensors.values():  # nothing allocated beyond what the file holds
                assert tensor.numel() * tensor.element_size() <= (root / "runs" / "math" / "signals.safetensors").stat().st_size
        store.records()
        for outcome in store.outcomes():
            assert isinstance(outcome["retention"], dict)
        for merge in store.merges():
            assert isinstance(merge["claimed"], bool) and isinstance(merge["merged"], bool)
        features = store.pair_features("math", "code")
        assert features is None or isinstance(features, dict)
        store.pairs()
        # The store still takes every kind of write.
        store.write_record("math", {"run_id": "fresh"}, {"x": torch.ones(3)}, overwrite=True)
        assert store.load("math").run_id == "fresh" and store.runs() == ["math"]
        store.record_outcome(["math"], "linear", {"math": 1.0})
        store.write_pair_features("math", "code", {"a": 1.0})
        assert store.pair_features("math", "code") == {"a": 1.0}
        store.mark_merged(merge_set_id(["math", "code"]), {"method": "linear"})


STORE_FILES = {
    "meta.json": ["run_id", "status", "schema_version", "write_id", "extra", "base_model", "run_name", "created", "updated"],
    "store.json": ["format", "schema_version", "created_by"],
    "outcome": ["id", "runs", "method", "retention", "scores", "schema_version", "created"],
    "pair": ["run_a", "run_b", "features"],
    "result.json": ["set_id", "info", "merged"],
    "CLAIM": ["set_id", "pid", "host"],
}


@pytest.mark.parametrize("kind, template_keys", list(STORE_FILES.items()), ids=list(STORE_FILES))
def test_hostile_store_metadata(template_store: Path, kind: str, template_keys: list[str]) -> None:
    template = json.loads(_store_file(template_store, kind).read_bytes() or b"{}")

    @FUZZ
    @given(content=mutated_json(template, template_keys))
    @example(content=b"[" * 200_000 + b"]" * 200_000)
    @example(content=b'{"features": ["abc"], "run_a": "math", "run_b": "code"}')
    def case(content: bytes) -> None:
        with confined() as work:
            root = work / "store"
            shutil.copytree(template_store, root)
            _store_file(root, kind).write_bytes(content)
            _exercise_store(root, kind)

    case()


def test_hostile_signals_header(template_store: Path) -> None:
    data = (template_store / "runs" / "math" / "signals.safetensors").read_bytes()

    @FUZZ
    @given(content=hostile_safetensors(data))
    def case(content: bytes) -> None:
        with confined() as work:
            root = work / "store"
            shutil.copytree(template_store, root)
            (root / "runs" / "math" / "signals.safetensors").write_bytes(content)
            _exercise_store(root, "signals.safetensors")

    case()
    # An offset the JSON parser reads as infinity (found by this test): skipped, not an OverflowError.
    header, payload = safetensors_parts(data)
    header["x"]["data_offsets"][1] = "INFINITY"
    text = json.dumps(header).replace('"INFINITY"', "1e999").encode()
    with confined() as work:
        root = work / "store"
        shutil.copytree(template_store, root)
        (root / "runs" / "math" / "signals.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + payload)
        _exercise_store(root, "signals.safetensors")


@FUZZ
@given(name=st.text(max_size=20) | st.sampled_from(["math\n", "../x", "/abs", "a\x00b", ".", "..", "a/../b", "con", "x" * 201]))
def test_store_names_stay_inside_the_store(name: str) -> None:
    with confined() as work:
        store = ProbeStore(work / "store")
        try:
            check_name(name)
        except StoreError:
            with pytest.raises(StoreError):
                store.write_record(name, {}, {"x": torch.zeros(1)})
            with pytest.raises(StoreError):
                store.claim_merge(name)
            return
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}", name) and ".." not in name  # e.g. no trailing newline
        store.write_record(name, {}, {"x": torch.zeros(1)})
        assert (work / "store" / "runs" / name / "meta.json").is_file() and store.runs() == [name]


# ----------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA adapter (alpha 8) on the tiny Llama's q_proj and v_proj."""
    path = tmp_path_factory.mktemp("adapters") / "good"
    build_lora_model(seed=1, target_modules=["q_proj", "v_proj"]).save_pretrained(str(path))
    return path


CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "use_dora", "alpha_pattern", "rank_pattern", "peft_type", "base_model_name_or_path",
               "fan_in_fan_out", "target_modules", "task_type"]
patterns = st.dictionaries(st.sampled_from(["q_proj", "v_proj", ".*", "(", "[", "layers\\.0\\..*", "model.layers.1.self_attn.v_proj"]),
                           json_scalars | odd_numbers, max_size=2)


def _merge_if_loadable(adapter: Path, good: Path, work: Path) -> None:
    """Load the adapter; if it loads, merge it with a good one and check the written result."""
    try:
        loaded = load_adapter(adapter)
    except AdapterError:
        return
    for module in loaded.modules.values():
        assert torch.isfinite(torch.tensor(module.scaling)) and module.A.is_floating_point()
    out = work / "merged"
    try:
        merge_adapters([adapter, good], out_dir=out, show_progress=False)
    except MergeProbeError:
        assert not out.exists()
        return
    merged = load_adapter(out)
    assert all(torch.isfinite(m.A).all() and torch.isfinite(m.B).all() for m in merged.modules.values())


def test_hostile_adapter_configs(good_adapter: Path) -> None:
    config = json.loads((good_adapter / "adapter_config.json").read_text())

    @FUZZ_SLOW
    @given(
        content=st.one_of(
            st.builds(
                lambda changes, drops: json.dumps({**{k: v for k, v in config.items() if k not in drops}, **changes}).encode(),
                st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values | odd_numbers | patterns, max_size=3),
                st.sets(st.sampled_from(CONFIG_KEYS), max_size=2),
            ),
            mutated_json(config, CONFIG_KEYS),
        )
    )
    @example(content=json.dumps({**config, "r": 10**30}).encode())
    @example(content=json.dumps({**config, "lora_alpha": 1e308}).encode())
    @example(content=json.dumps({**config, "use_rslora": "false"}).encode())
    @example(content=json.dumps({**config, "base_model_name_or_path": ["x"]}).encode())
    @example(content=json.dumps({**config, "alpha_pattern": {"(": 2}}).encode())
    @example(content=json.dumps({k: v for k, v in config.items() if k != "lora_alpha"}).encode())
    def case(content: bytes) -> None:
        with confined() as work:
            adapter = work / "adapter"
            shutil.copytree(good_adapter, adapter)
            (adapter / "adapter_config.json").write_bytes(content)
            _merge_if_loadable(adapter, good_adapter, work)

    case()


def test_hostile_adapter_weights_header(good_adapter: Path) -> None:
    data = (good_adapter / "adapter_model.safetensors").read_bytes()

    def check(content: bytes) -> None:
        with confined() as work:
            adapter = work / "adapter"
            shutil.copytree(good_adapter, adapter)
            (adapter / "adapter_model.safetensors").write_bytes(content)
            _merge_if_loadable(adapter, good_adapter, work)

    # The named cases first: each must be refused.
    header, payload = safetensors_parts(data)
    name = min(k for k in header if k != "__metadata__")
    lying_shape = json.loads(json.dumps(header))
    lying_shape[name]["shape"] = [4, 10**6]  # claims 16 MB in a file of a few KiB
    lying_offsets = json.loads(json.dumps(header))
    lying_offsets[name]["data_offsets"] = [0, 10**9]
    wrong_dtype = json.loads(json.dumps(header))
    wrong_dtype[name]["dtype"] = "I32"  # same byte size as F32: a well-formed file of integer "factors"
    named = {
        "oversized header length": struct.pack("<Q", 2**63) + data[8:],
        "header longer than the file": struct.pack("<Q", len(data)) + data[8:],
        "truncated": data[: len(data) // 2],
        "shape claims more bytes than the file has": safetensors_bytes(lying_shape, payload),
        "offsets past the end": safetensors_bytes(lying_offsets, payload),
        "integer dtype": safetensors_bytes(wrong_dtype, payload),
        "unknown dtype": safetensors_bytes({**header, name: {**header[name], "dtype": "Q99"}}, payload),
    }
    for what, content in named.items():
        with confined() as work:
            adapter = work / "adapter"
            shutil.copytree(good_adapter, adapter)
            (adapter / "adapter_model.safetensors").write_bytes(content)
            with pytest.raises(AdapterError):
                load_adapter(adapter)
            assert sorted(p.name for p in work.iterdir()) == ["adapter"], what

    FUZZ_SLOW(given(content=hostile_safetensors(data))(check))()


@FUZZ_SLOW
@given(content=st.binary(max_size=300) | st.binary(max_size=100).map(lambda b: b"\x80\x02" + b))
def test_hostile_bin_weights_are_refused(content: bytes) -> None:
    """``adapter_model.bin`` is read with ``torch.load(weights_only=True)``: junk is an AdapterError."""
    with confined() as work:
        (work / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
        (work / "adapter_model.bin").write_bytes(content)
        with pytest.raises(AdapterError):
            load_adapter(work)


class _RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def test_pickled_code_in_bin_weights_never_runs(tmp_path: Path) -> None:
    """A ``.bin`` whose pickle would call ``os.system`` on load: refused, and the command never ran."""
    marker = tmp_path / "executed"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    torch.save({"x.lora_A.weight": torch.zeros(2, 3), "payload": _RunsACommand(f"touch {marker}")}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only"):
        load_adapter(adapter)
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8, torch.float8_e4m3fn])
def test_non_float_factors_are_refused(good_adapter: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    """A well-formed file whose factors are integers, bool or float8: refused, not merged and written back as integers."""
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: (v * 10).to(dtype) for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=f"dtype {dtype}"):
        load_adapter(adapter)


def test_negative_alpha_is_accepted_as_peft_applies_it(good_adapter: Path, tmp_path: Path) -> None:
    """PEFT accepts a negative lora_alpha (the update changes sign); so does mergeprobe, with the same ΔW."""
    from peft import PeftModel

    from tests.conftest import build_tiny_llama
    from tests.test_adapters import peft_deltas

    adapter = tmp_path / "negative"
    shutil.copytree(good_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": -8}))
    ours = load_adapter(adapter)
    expected = peft_deltas(PeftModel.from_pretrained(build_tiny_llama(), str(adapter)))
    for key, delta in expected.items():
        torch.testing.assert_close(ours.delta(key), delta)
        torch.testing.assert_close(ours.delta(key), -load_adapter(good_adapter).delta(key))


# ----------------------------------------------------------------- path traversal when writing adapters

key_pieces = st.sampled_from(["..", ".", "/", "\\", "\x00", "a", "q_proj", "layers", "0", "/etc/passwd", "~", " ", "\n", "é", "C:", "%2e%2e", "-", "_"])
hostile_keys = st.lists(key_pieces, min_size=1, max_size=6).map("".join) | st.text(max_size=24)


def _factors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)


def _plain_dotted(key: str) -> bool:
    return all(re.fullmatch(r"[A-Za-z0-9_\-]+", part) for part in key.split("."))


@FUZZ
@given(key=hostile_keys)
@example(key="../../evil")
@example(key="/etc/cron.d/x")
@example(key="a.b\n")
@example(key="a\x00b")
def test_module_keys_cannot_traverse_when_written(key: str) -> None:
    with confined() as work:
        out = work / "out"
        try:
            save_adapter({key: _factors(0)}, out)
        except AdapterError:
            assert not _plain_dotted(key) and not out.exists()
            assert list(work.iterdir()) == []
        else:
            assert _plain_dotted(key)
            assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
            assert list(work.iterdir()) == [out]


@FUZZ
@given(key=hostile_keys, via=st.sampled_from(["state_dict", "directory"]))
@example(key="../../evil", via="directory")
def test_adapters_with_traversal_keys_merge_only_inside_out_dir(key: str, via: str) -> None:
    from safetensors.torch import save_file

    with confined() as work:
        sources: list[Any] = []
        for seed in (1, 2):
            b, a = _factors(seed)
            state = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
            if via == "state_dict":
                try:
                    sources.append(adapter_from_state_dict(state, {"r": 2, "lora_alpha": 2}, name=f"s{seed}"))
                except AdapterError:
                    return
            else:
                folder = work / f"in{seed}"
                folder.mkdir()
                (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
                try:
                    save_file(state, str(folder / "adapter_model.safetensors"))
                except Exception:  # noqa: BLE001 - the safetensors writer itself refuses some names
                    return
                sources.append(folder)
        out = work / "out"
        try:
            merge_adapters(sources, out_dir=out, show_progress=False)
        except MergeProbeError:
            assert not out.exists()
        else:
            assert _plain_dotted(key)
            assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "mergeprobe_merge.json"]
        assert {p.name for p in work.iterdir()} <= {"in1", "in2", "out"}


@FUZZ
@given(name=st.sampled_from(["", ".", "..", "../x", "/tmp/x", "a/b", "a\x00", ".hidden", "adapter_config.json", "\n"]) | st.text(max_size=12))
def test_extra_file_names_stay_inside_out_dir(name: str) -> None:
    with confined() as work:
        out = work / "out"
        try:
            save_adapter({"layers.0.q_proj": _factors(0)}, out, extra_files={name: "report"})
        except AdapterError:
            assert not out.exists() and list(work.iterdir()) == []
        else:
            assert (out / name).read_text() == "report" and (out / name).parent == out


# ----------------------------------------------------------------- predictor files


def _zip(members: dict[str, bytes]) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


module_names = st.sampled_from(["os", "posix", "subprocess", "builtins", "shutil", "mergeprobe_fuzz_never_imported", "sklearn.ensemble._hist_gradient_boosting.gradient_boosting"]) | st.from_regex(r"fuzz_[a-z]{1,10}(\.[a-z]{1,6})?", fullmatch=True)
class_names = st.sampled_from(["system", "eval", "exec", "Popen", "rmtree", "MergeProbe", "HistGradientBoostingRegressor", "dict", "list"]) | st.text(max_size=8)
loaders = st.sampled_from(["ObjectNode", "FunctionNode", "MethodNode", "TypeNode", "ReduceNode", "DictNode", "JsonNode", "NdArrayNode", "PartialNode"])


@st.composite
def skops_like_schema(draw: Any) -> Any:
    """A schema with skops' shape whose nodes name arbitrary (often dangerous) types."""
    def node(depth: int) -> dict[str, Any]:
        content: Any = draw(json_values)
        if depth < 2 and draw(st.booleans()):
            content = {draw(st.text(max_size=6)): node(depth + 1) for _ in range(draw(st.integers(1, 2)))}
        return {"__class__": draw(class_names), "__module__": draw(module_names), "__loader__": draw(loaders), "content": content, "__id__": draw(st.integers())}

    schema = node(0)
    schema["_skops_version"] = "0.16.0"
    return schema


@pytest.fixture(scope="module")
def fitted_probe() -> Any:
    from mergeprobe.predictor import fit_from_table
    from tests.test_predictor import synthetic_rows

    return fit_from_table(synthetic_rows(60), max_iter=10, random_state=0)


def _load_refused(path: Path) -> None:
    """Loading must raise PredictorError, import nothing new that the file names, and run nothing."""
    from mergeprobe.predictor import MergeProbe

    modules_before = set(sys.modules)
    with pytest.raises(PredictorError):
        MergeProbe.load(path)
    new = {m for m in set(sys.modules) - modules_before if m.startswith(("fuzz_", "mergeprobe_fuzz"))}
    assert not new, f"loading imported {new}"


@FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=100).map(lambda b: b"\x80\x04" + b),  # pickle protocol header
        json_values.map(lambda v: _zip({"schema.json": json.dumps(v).encode()})),
        skops_like_schema().map(lambda s: _zip({"schema.json": json.dumps(s).encode()})),
        st.dictionaries(st.text(min_size=1, max_size=10), st.binary(max_size=50), max_size=3).map(_zip),
        deep_nesting.map(lambda b: _zip({"schema.json": b})),
    )
)
@example(content=_zip({"schema.json": b"[" * 200_000 + b"]" * 200_000}))
@example(content=_zip({"schema.json": json.dumps({"__class__": "system", "__module__": "os", "__loader__": "FunctionNode", "content": {"module_path": "os", "function": "system"}}).encode()}))
def test_hostile_predictor_files_are_refused(content: bytes) -> None:
    with confined() as work:
        path = work / "probe.skops"
        path.write_bytes(content)
        _load_refused(path)
        assert [p.name for p in work.iterdir()] == ["probe.skops"]


@pytest.mark.parametrize("payload_name", ["os.system", "eval", "subprocess.call", "functools.partial", "operator.attrgetter", "object_array", "type"])
def test_skops_file_carrying_callables_is_refused_and_nothing_runs(fitted_probe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload_name: str) -> None:
    import builtins
    import functools
    import operator
    import subprocess

    import numpy as np
    import skops.io as sio
    from sklearn.base import clone

    calls: list[Any] = []
    payload = {
        "os.system": os.system,
        "eval": builtins.eval,
        "subprocess.call": subprocess.call,
        "functools.partial": functools.partial(os.system, "echo pwned"),
        "operator.attrgetter": operator.attrgetter("__class__"),
        "object_array": np.array([os.system], dtype=object),
        "type": type,
    }[payload_name]
    probe = clone(fitted_probe).fit([{"b_crowding_top.max": float(i)} for i in range(20)], np.linspace(0, 1, 20))
    probe.payload_ = payload
    path = tmp_path / "evil.skops"
    sio.dump(probe, path)
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    monkeypatch.setattr(subprocess, "call", lambda *args, **kwargs: calls.append(args))
    _load_refused(path)
    assert calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.skops"]


def test_truncated_real_predictor_file_is_refused(fitted_probe: Any) -> None:
    with confined() as work:
        path = fitted_probe.save(work / "probe.skops")
        data = path.read_bytes()

    @FUZZ
    @given(keep=st.integers(0, len(data) - 1), flip=st.integers(0, len(data) - 1))
    def case(keep: int, flip: int) -> None:
        with confined() as work:
            target = work / "probe.skops"
            corrupted = bytearray(data)
            corrupted[flip] ^= 0xFF
            for content in (data[:keep], bytes(corrupted)):
                target.write_bytes(content)
                from mergeprobe.predictor import MergeProbe

                try:
                    MergeProbe.load(target)  # a flipped byte in a stored, uncompressed array can still load
                except PredictorError:
                    pass

    case()
