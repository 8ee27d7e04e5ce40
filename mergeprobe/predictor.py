"""MergeProbe: predict how much of an adapter's utility survives a merge (ALGORITHMS.md §5).

:class:`MergeProbe` is a scikit-learn regressor from pairwise features (as made by
:mod:`mergeprobe.features`, names ``"<signal>.<summary>"``) to the retention of the first
run of the pair, ``retention_i = score_i(merged) / score_i(i alone)``. It fits two
histogram gradient-boosted tree ensembles: one for the mean (squared error) and one for
a lower bound (pinball loss at ``quantile``, default 0.2).

Missing features are NaN. Histogram gradient boosting routes NaN natively: a feature
that had missing values in training sends them down the side learnt for them; a
feature that never did sends them to the child that held most training samples. So a
predictor fitted before a signal existed still predicts, on the signals it knows.

Models are saved with skops, never with pickle, and loaded only when every type in the
file is on a fixed allow-list (:data:`TRUSTED_TYPES`).

There is no default model fitted on invented numbers: :meth:`MergeProbe.default` loads
``mergeprobe/data/mergeprobe_default.skops`` when the benchmark has produced one, and
otherwise says how to fit your own (``mergeprobe fit``, :func:`fit_from_store`,
:func:`fit_from_table`).

Example
-------
>>> import numpy as np
>>> from mergeprobe.predictor import MergeProbe
>>> rng = np.random.default_rng(0)
>>> rows = [{"update_alignment.mean": float(c)} for c in rng.uniform(-1, 1, 200)]
>>> y = [0.7 + 0.3 * r["update_alignment.mean"] for r in rows]
>>> probe = MergeProbe(max_iter=50).fit(rows, y)
>>> probe.feature_names_
['update_alignment.mean']
>>> high, low = probe.predict_retention([{"update_alignment.mean": 0.9}, {"update_alignment.mean": -0.9}])
>>> bool(high > low)
True
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import warnings
import zipfile
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from mergeprobe.errors import PredictorError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "LABEL_COLUMN",
    "TRUSTED_TYPES",
    "MergeProbe",
    "fit_from_store",
    "fit_from_table",
    "leave_one_group_out",
    "predict_pairwise",
    "read_table",
    "rows_from_store",
]

LABEL_COLUMN = "retention"
GROUP_COLUMNS = ("group", "task")
DEFAULT_MODEL_NAME = "mergeprobe_default.skops"

_PRIMITIVE_TYPES = {
    "builtins.bool",
    "builtins.bytes",
    "builtins.dict",
    "builtins.float",
    "builtins.int",
    "builtins.list",
    "builtins.NoneType",
    "builtins.str",
    "builtins.tuple",
}
_NUMPY_TYPES = {
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.bool",
    "numpy.bool_",
    "numpy.float32",
    "numpy.float64",
    "numpy.int8",
    "numpy.int32",
    "numpy.int64",
    "numpy.uint8",
    "numpy.uint32",
    "numpy.uint64",
}
_HGB = "sklearn.ensemble._hist_gradient_boosting"
#: Every type a saved :class:`MergeProbe` may contain. Any other type in a file is refused
#: before anything in it is constructed.
TRUSTED_TYPES: frozenset[str] = frozenset(
    _PRIMITIVE_TYPES
    | _NUMPY_TYPES
    | {
        "mergeprobe.predictor.MergeProbe",
        f"{_HGB}.gradient_boosting.HistGradientBoostingRegressor",
        f"{_HGB}.predictor.TreePredictor",
        f"{_HGB}.binning._BinMapper",
        "sklearn._loss.loss.HalfSquaredError",
        "sklearn._loss.loss.PinballLoss",
        "sklearn._loss.link.IdentityLink",
        "sklearn._loss.link.Interval",
        "sklearn._loss._loss.CyHalfSquaredError",
        "sklearn._loss._loss.CyPinballLoss",
        "numpy.random._generator.Generator",
        "numpy.random.mtrand.RandomState",
    }
)


# --------------------------------------------------------------------- skops I/O
def _dump_skops_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with skops to ``path`` atomically (temp file, fsync, rename; readable as the umask allows)."""
    import skops.io as sio

    from mergeprobe.store import _atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _atomic_write_bytes(path, sio.dumps(obj))


_MAX_SCHEMA_BYTES = 64 * 1024 * 1024
"""Largest schema.json a predictor file may hold (a MergeProbe's is a few hundred KiB)."""


def _schema_types(node: Any, found: set[str]) -> None:
    """Collect ``module.class`` of every node of a skops schema, without importing anything."""
    if isinstance(node, Mapping):
        if "__loader__" in node:
            found.add(f"{node.get('__module__')}.{node.get('__class__')}")
        for value in node.values():
            _schema_types(value, found)
    elif isinstance(node, list):
        for value in node:
            _schema_types(value, found)


def _refuse_outside(types: Collection[str], allowed: Collection[str], path: Path, what: str) -> None:
    refused = sorted(set(types) - set(allowed))
    if refused:
        raise PredictorError(
            f"{what} file {str(path)!r} contains types that are not on mergeprobe's allow-list: "
            f"{', '.join(refused)}. It was not loaded. Only load files you made with mergeprobe; "
            f"if you did, your scikit-learn version may name its internals differently: refit and save it again."
        )


def _load_skops_trusted(path: str | os.PathLike[str], allowed: Collection[str], what: str) -> Any:
    """Load a skops file only if every type it contains is in ``allowed``.

    Two checks, both before anything is constructed: every node of the file's schema
    must name an allowed type (this also refuses types skops would trust on its own,
    such as ``collections.OrderedDict``), and so must everything
    ``skops.io.get_untrusted_types`` reports. Pickle files are refused outright.
    """
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise PredictorError(f"{what} file {str(path)!r} does not exist.")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:1] == b"\x80" or not zipfile.is_zipfile(path):
        kind = "a pickle file" if head[:1] == b"\x80" else "not a skops file (not a zip archive)"
        raise PredictorError(
            f"{what} file {str(path)!r} is {kind}; mergeprobe loads only skops files and never unpickles, "
            f"because unpickling can run arbitrary code. Re-create it and save it with skops (`.save(path)`)."
        )
    found: set[str] = set()
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.getinfo("schema.json").file_size > _MAX_SCHEMA_BYTES:
                raise PredictorError(f"{what} file {str(path)!r} has a schema.json larger than {_MAX_SCHEMA_BYTES} bytes; it is not a MergeProbe.")
            schema = json.loads(archive.read("schema.json"))
        _schema_types(schema, found)
    except PredictorError:
        raise
    # A damaged or hostile archive fails in many ways: a bad CRC or header (BadZipFile), a bad deflate stream
    # (zlib.error), an unknown compression method (NotImplementedError), an encrypted entry (RuntimeError), invalid
    # JSON (ValueError), nesting deeper than the recursion limit (RecursionError, a RuntimeError).
    except (KeyError, EOFError, OSError, ValueError, NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error) as err:
        raise PredictorError(f"{what} file {str(path)!r} is not a valid skops file ({type(err).__name__}: {err}).") from err
    # The schema check comes first: nothing has been imported or built when it refuses.
    _refuse_outside(found, allowed, path, what)
    try:
        untrusted = set(sio.get_untrusted_types(file=path))
    except Exception as err:  # skops raises assorted errors on malformed schemas
        raise PredictorError(f"{what} file {str(path)!r} cannot be inspected by skops ({err}).") from err
    _refuse_outside(untrusted, allowed, path, what)
    try:
        return sio.load(path, trusted=sorted(untrusted))
    except Exception as err:
        raise PredictorError(f"{what} file {str(path)!r} could not be loaded by skops ({err}).") from err


# ----------------------------------------------------------------- dict → matrix
def _is_records(X: Any) -> bool:
    return isinstance(X, (list, tuple)) and len(X) > 0 and all(isinstance(row, Mapping) for row in X)


def _to_float(value: Any, key: str, index: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (Real, np.number)):
        raise PredictorError(f"feature {key!r} of row {index} is {value!r}, not a number.")
    return float(value)


def _records_to_matrix(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str], *, require_overlap: bool = True
) -> np.ndarray:
    """One row per dict, one column per name; a missing key is NaN, an unknown key is ignored.

    With ``require_overlap`` a row that shares no key with ``names`` is an error (it
    would be predicted from nothing, usually because of a feature-naming mismatch).
    """
    known = set(names)
    matrix = np.full((len(rows), len(names)), np.nan)
    column = {name: k for k, name in enumerate(names)}
    for i, row in enumerate(rows):
        if require_overlap and not known.intersection(row):
            example = ", ".join(list(names)[:3])
            raise PredictorError(
                f"row {i} has none of the {len(names)} features this MergeProbe was fitted on "
                f"(e.g. {example}); its keys are {sorted(row)[:5]}."
            )
        for key, value in row.items():
            if key in column:
                matrix[i, column[key]] = _to_float(value, key, i)
    return matrix


def _record_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: set[str] = set()
    for row in rows:
        names.update(row)
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise PredictorError(f"feature names must be strings, got {bad[:3]}.")
    return sorted(names)


# ----------------------------------------------------------------------- the model
class MergeProbe(RegressorMixin, BaseEstimator):
    """Predict merge retention from early-training pairwise features, with a lower bound.

    Two :class:`~sklearn.ensemble.HistGradientBoostingRegressor` share the tree
    parameters below: ``mean_model_`` (squared error) and ``lower_model_`` (pinball
    loss at ``quantile``).

    Parameters
    ----------
    quantile : float, default=0.2
        Quantile of retention the lower-bound model predicts.
    max_iter : int, default=200
        Boosting iterations of each model.
    learning_rate : float, default=0.05
        Shrinkage.
    max_leaf_nodes : int or None, default=15
        Leaves per tree.
    max_depth : int or None, default=None
        Depth limit per tree.
    min_samples_leaf : int, default=5
        Minimum samples per leaf (benchmark tables hold hundreds of rows, not millions).
    l2_regularization : float, default=0.0
        L2 penalty on leaf values.
    monotonic_cst : array-like of int, dict or None, default=None
        Monotonic constraint per feature (1 increasing, -1 decreasing, 0 none); a dict
        maps feature names to constraints and needs named features (dicts or a table).
    random_state : int, RandomState instance or None, default=None
        Seed of the tree ensembles (used when features are subsampled or ties are broken).
    n_threads : int or None, default=1
        OpenMP threads for fitting and predicting. One thread is fastest on the small
        tables MergeProbe learns from and never competes with a training job for cores
        (on a busy 2-core machine our test suite ran over 30× slower with the library default); ``None`` keeps
        the process default.

    Attributes
    ----------
    mean_model_ : HistGradientBoostingRegressor
    lower_model_ : HistGradientBoostingRegressor
    n_features_in_ : int
    n_iter_ : int
        Boosting iterations run (``max_iter``: there is no early stopping).
    feature_names_in_ : ndarray of str
        Only when fitted on dicts or a table with named columns.
    feature_names_ : list of str or None
        The same names as a list (``None`` for an unnamed matrix); the column order
        :meth:`predict_retention` uses.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.linspace(0, 1, 60)[:, None]
    >>> probe = MergeProbe(max_iter=30).fit(X, 0.5 + 0.5 * X[:, 0])
    >>> bool(probe.predict_lower(X).mean() <= probe.predict(X).mean())
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        "quantile": [Interval(Real, 0, 1, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "max_leaf_nodes": [Interval(Integral, 2, None, closed="left"), None],
        "max_depth": [Interval(Integral, 1, None, closed="left"), None],
        "min_samples_leaf": [Interval(Integral, 1, None, closed="left")],
        "l2_regularization": [Interval(Real, 0, None, closed="left")],
        "monotonic_cst": ["array-like", dict, None],
        "random_state": ["random_state"],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        quantile: float = 0.2,
        max_iter: int = 200,
        learning_rate: float = 0.05,
        max_leaf_nodes: int | None = 15,
        max_depth: int | None = None,
        min_samples_leaf: int = 5,
        l2_regularization: float = 0.0,
        monotonic_cst: Any = None,
        random_state: Any = None,
        n_threads: int | None = 1,
    ) -> None:
        self.quantile = quantile
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.monotonic_cst = monotonic_cst
        self.random_state = random_state
        self.n_threads = n_threads

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        return tags

    # ------------------------------------------------------------------ fitting
    def _monotonic_vector(self, n_features: int, names: list[str] | None) -> list[int] | None:
        if self.monotonic_cst is None:
            return None
        if isinstance(self.monotonic_cst, Mapping):
            if names is None:
                raise ValueError("monotonic_cst given as a dict needs named features (fit on dicts or a table).")
            unknown = sorted(set(self.monotonic_cst) - set(names))
            if unknown:
                raise ValueError(f"monotonic_cst names unknown features: {', '.join(map(str, unknown))}.")
            return [int(self.monotonic_cst.get(name, 0)) for name in names]
        cst = [int(c) for c in np.asarray(self.monotonic_cst).ravel()]
        if len(cst) != n_features:
            raise ValueError(f"monotonic_cst has {len(cst)} entries but X has {n_features} features.")
        return cst

    def _tree_model(self, **loss: Any) -> HistGradientBoostingRegressor:
        return HistGradientBoostingRegressor(
            learning_rate=self.learning_rate,
            max_iter=self.max_iter,
            max_leaf_nodes=self.max_leaf_nodes,
            max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf,
            l2_regularization=self.l2_regularization,
            early_stopping=False,
            random_state=self.random_state,
            **loss,
        )

    def _thread_limit(self) -> contextlib.AbstractContextManager:
        if self.n_threads is None:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=self.n_threads, user_api="openmp")

    def fit(self, X: Any, y: Any) -> MergeProbe:
        """Fit both models.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), a table with named columns, or list of dict
            Features. With dicts, the feature names are the sorted union of their keys
            and a missing key is NaN.
        y : array-like of shape (n_samples,)
            Retention of the first run of each pair.

        Returns
        -------
        self : MergeProbe
        """
        self._validate_params()
        names: list[str] | None = None
        if _is_records(X):
            names = _record_names(X)
            X = _records_to_matrix(X, names, require_overlap=False)
        X, y = validate_data(self, X, y, y_numeric=True, ensure_all_finite="allow-nan")
        if names is not None:
            self.feature_names_in_ = np.asarray(names, dtype=object)
        self.feature_names_ = [str(n) for n in self.feature_names_in_] if hasattr(self, "feature_names_in_") else None
        cst = self._monotonic_vector(X.shape[1], self.feature_names_)
        # A feature missing from every training row carries no information, and
        # HistGradientBoosting cannot bin an all-NaN column: train on zeros there.
        empty = np.isnan(X).all(axis=0)
        if empty.any():
            X = X.copy()
            X[:, empty] = 0.0
        with self._thread_limit():
            self.mean_model_ = self._tree_model(loss="squared_error", monotonic_cst=cst).fit(X, y)
            self.lower_model_ = self._tree_model(loss="quantile", quantile=self.quantile, monotonic_cst=cst).fit(X, y)
        self.n_iter_ = self.mean_model_.n_iter_
        return self

    # --------------------------------------------------------------- predicting
    def _matrix(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        if _is_records(X):
            if self.feature_names_ is None:
                raise PredictorError(
                    "this MergeProbe was fitted on an unnamed matrix, so it cannot read feature dicts; "
                    "fit it on dicts or a named table."
                )
            return check_array(_records_to_matrix(X, self.feature_names_), ensure_all_finite="allow-nan")
        return validate_data(self, X, reset=False, ensure_all_finite="allow-nan")

    def predict(self, X: Any) -> np.ndarray:
        """Predicted mean retention, shape ``(n_samples,)``."""
        X = self._matrix(X)
        with self._thread_limit():
            return self.mean_model_.predict(X)

    def predict_lower(self, X: Any) -> np.ndarray:
        """Lower bound of retention: the ``quantile`` model, never above the mean prediction.

        Quantile and mean models are fitted separately and can cross; the bound is
        ``min(quantile prediction, mean prediction)`` so it is never more optimistic
        than the estimate it bounds.
        """
        X = self._matrix(X)
        with self._thread_limit():
            return np.minimum(self.lower_model_.predict(X), self.mean_model_.predict(X))

    def predict_retention(self, features: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Mean retention for one feature dict or a list of them (missing features are NaN)."""
        return self.predict(self._records(features))

    def predict_lower_retention(self, features: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Lower bound of retention for one feature dict or a list of them."""
        return self.predict_lower(self._records(features))

    @staticmethod
    def _records(features: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        rows = [features] if isinstance(features, Mapping) else list(features)
        if not _is_records(rows):
            raise PredictorError("predict_retention takes a feature dict or a non-empty list of feature dicts.")
        return rows

    # -------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save with skops (no pickle), atomically: a crash never leaves half a file.

        Returns the path written.
        """
        try:
            check_is_fitted(self)
        except Exception as err:
            raise PredictorError(f"cannot save an unfitted MergeProbe to {str(path)!r}; fit it first.") from err
        return _dump_skops_atomic(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MergeProbe:
        """Load a MergeProbe saved with :meth:`save`.

        Every type in the file must be on :data:`TRUSTED_TYPES`; anything else (a
        custom class, a pickle file) raises :class:`~mergeprobe.errors.PredictorError`
        before any object in the file is built.
        """
        obj = _load_skops_trusted(path, TRUSTED_TYPES, "MergeProbe")
        if not isinstance(obj, cls):
            raise PredictorError(f"{str(path)!r} holds a {type(obj).__name__}, not a MergeProbe.")
        return obj

    @classmethod
    def default(cls) -> MergeProbe:
        """The MergeProbe fitted on the project's benchmark, when this build ships one."""
        path = _default_model_path()
        if not path.is_file():
            raise PredictorError(
                f"the default MergeProbe model is not shipped in this build ({path} is missing). "
                "Fit one on your own merge outcomes: `mergeprobe fit` (or mergeprobe.predictor.fit_from_store / "
                "fit_from_table), then `MergeProbe.load(path)`."
            )
        return cls.load(path)


def _default_model_path() -> Path:
    return Path(__file__).resolve().parent / "data" / DEFAULT_MODEL_NAME


# ------------------------------------------------------------------ feature tables
def read_table(path_or_rows: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a feature table: a JSONL file, a JSON list, a CSV file, or rows already in memory.

    CSV cells are parsed as numbers where they can be; an empty cell is missing (NaN).
    """
    if not isinstance(path_or_rows, (str, os.PathLike)):
        rows = [dict(row) for row in path_or_rows]
        if not all(isinstance(row, dict) for row in rows):
            raise PredictorError("a feature table given in memory must be a list of dicts.")
        return rows
    path = Path(path_or_rows)
    if not path.is_file():
        raise PredictorError(f"feature table {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise PredictorError(f"feature table {str(path)!r} is not valid JSON ({err}).") from err
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PredictorError(f"{path}:{number} is not a JSON object ({err}).") from err
    if not all(isinstance(row, dict) for row in rows):
        raise PredictorError(f"feature table {str(path)!r} must hold one JSON object per row.")
    return rows


def _parse_cell(value: str | None) -> Any:
    if value is None or value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _split_table(
    rows: Sequence[Mapping[str, Any]], exclude: Collection[str] = ()
) -> tuple[list[dict[str, Any]], np.ndarray, list[str] | None]:
    """Feature dicts, retention labels and groups of a table.

    Features are the numeric columns other than ``retention``, ``group``, ``task`` and
    ``exclude``; text columns (run names, methods) are ignored.
    """
    if not rows:
        raise PredictorError("the feature table is empty.")
    meta = {LABEL_COLUMN, *GROUP_COLUMNS, *exclude}
    text_columns = {
        key
        for row in rows
        for key, value in row.items()
        if key not in meta
        and value is not None
        and (isinstance(value, (str, bool)) or not isinstance(value, (Real, np.number)))
    }
    features, labels, groups = [], [], []
    for i, row in enumerate(rows):
        label = row.get(LABEL_COLUMN)
        if isinstance(label, bool) or not isinstance(label, (Real, np.number)) or not math.isfinite(float(label)):
            raise PredictorError(f"row {i} of the feature table has no finite {LABEL_COLUMN!r} (got {label!r}).")
        labels.append(float(label))
        features.append({k: v for k, v in row.items() if k not in meta and k not in text_columns})
        groups.append(next((str(row[c]) for c in GROUP_COLUMNS if row.get(c) is not None), None))
    if not any(features):
        raise PredictorError("the feature table has no numeric feature columns.")
    has_groups = all(g is not None for g in groups)
    return features, np.asarray(labels), (groups if has_groups else None)  # type: ignore[return-value]


def fit_from_table(
    path_or_rows: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    *,
    exclude: Collection[str] = (),
    **params: Any,
) -> MergeProbe:
    """Fit a :class:`MergeProbe` on a table of ``{features..., "retention": float, "task"/"group": str}``.

    Parameters
    ----------
    path_or_rows
        A ``.jsonl`` / ``.json`` / ``.csv`` file, or a list of row dicts.
    exclude
        Numeric columns that are not features (seeds, steps).
    **params
        :class:`MergeProbe` parameters.
    """
    features, y, _ = _split_table(read_table(path_or_rows), exclude)
    return MergeProbe(**params).fit(features, y)


# ------------------------------------------------------------------- probe store
def _finite_or_nan(features: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in features.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[key] = number if math.isfinite(number) else math.nan
    return out


def rows_from_store(store: Any, *, method: str | None = None) -> list[dict[str, Any]]:
    """Table rows from a probe store: one per member of every evaluated pair.

    For an outcome merging runs ``(a, b)``, member ``a`` gives the row
    ``store.pairwise_features(a, b) | {"retention": retention[a], "group": a}`` and
    ``b`` the row oriented ``(b, a)``. Outcomes of more than two runs, and members
    without a finite retention, are skipped. ``method`` keeps only outcomes merged with
    that method.
    """
    rows: list[dict[str, Any]] = []
    cache: dict[tuple[str, str], dict[str, float]] = {}
    for outcome in store.outcomes():
        runs = list(outcome.get("runs", ()))
        if len(runs) != 2 or (method is not None and outcome.get("method") != method):
            continue
        retention = outcome.get("retention", {}) or {}
        for i, j in ((runs[0], runs[1]), (runs[1], runs[0])):
            value = retention.get(i)
            if value is None or not math.isfinite(float(value)):
                continue
            if (i, j) not in cache:
                cache[(i, j)] = _finite_or_nan(store.pairwise_features(i, j))
            rows.append({**cache[(i, j)], LABEL_COLUMN: float(value), "group": str(i)})
    return rows


def fit_from_store(store: Any, *, method: str | None = None, **params: Any) -> MergeProbe:
    """Fit a :class:`MergeProbe` on the pairwise merge outcomes recorded in a probe store.

    ``store`` needs ``outcomes()`` (dicts with ``"runs"``, ``"method"``,
    ``"retention": {run: float}``) and ``pairwise_features(a, b)``; see
    :func:`rows_from_store`.
    """
    rows = rows_from_store(store, method=method)
    if not rows:
        which = f" merged with {method!r}" if method else ""
        raise PredictorError(
            f"the probe store has no evaluated pairwise merges{which} to learn from; "
            "evaluate some merges first (`mergeprobe evaluate`), or fit on a table with fit_from_table."
        )
    return fit_from_table(rows, **params)


def predict_pairwise(
    probe: MergeProbe, store: Any, runs: Sequence[str]
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Mean and lower-bound retention for every ordered pair of ``runs``.

    The two dicts are the ``retention`` and ``lower`` arguments of
    :func:`~mergeprobe.decision.decide`.
    """
    pairs = [(i, j) for i in runs for j in runs if i != j]
    if not pairs:
        return {}, {}
    features = [_finite_or_nan(store.pairwise_features(i, j)) for i, j in pairs]
    mean = probe.predict_retention(features)
    lower = probe.predict_lower_retention(features)
    return (
        {pair: float(v) for pair, v in zip(pairs, mean, strict=True)},
        {pair: float(v) for pair, v in zip(pairs, lower, strict=True)},
    )


# -------------------------------------------------------------------- evaluation
def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's ρ of two sequences; ``None`` when it is undefined (fewer than 3 values, a constant side)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(spearmanr(a, b).statistic)
    return value if math.isfinite(value) else None


def _scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    return {
        "spearman": spearman(pred, y),
        "mae": float(np.mean(np.abs(pred - y))),
        "rmse": float(np.sqrt(np.mean((pred - y) ** 2))),
    }


def leave_one_group_out(
    rows: Sequence[Mapping[str, Any]],
    groups: Sequence[Any] | None = None,
    *,
    probe: MergeProbe | None = None,
    cosine_feature: str = "update_alignment.mean",
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """Leave-one-group-out evaluation of a MergeProbe on a feature table, with baselines.

    Each group (a task, or a run) is held out in turn; the model is refit on the rest.
    Scores are computed on the pooled held-out predictions.

    Parameters
    ----------
    rows
        Table rows (features, ``"retention"``, optionally ``"group"``/``"task"``).
    groups
        One label per row; default the rows' ``"group"`` (else ``"task"``) column.
    probe
        Unfitted template (cloned per fold); default ``MergeProbe()``.
    cosine_feature
        Feature of the single-signal baseline.
    exclude
        Numeric columns that are not features.

    Returns
    -------
    dict
        ``n``, ``n_groups``, ``spearman``, ``mae``, ``rmse`` (``spearman`` is ``None`` when
        undefined), ``lower_coverage`` (share of labels at or above the lower bound),
        ``per_group`` ({group: {n, mae, spearman}}), ``predictions`` / ``lower`` (in row
        order) and ``baselines``: ``"mean"`` (the training mean) and ``"update_cosine"``
        (``cosine_feature`` alone, mapped to retention by isotonic regression; ``None``
        if the table lacks it).
    """
    from sklearn.isotonic import IsotonicRegression

    features, y, table_groups = _split_table(read_table(rows), exclude)
    labels = list(groups) if groups is not None else table_groups
    if labels is None or len(labels) != len(y):
        raise PredictorError(
            "leave_one_group_out needs one group per row: pass groups=, or give every row a 'group' or 'task'."
        )
    labels = np.asarray([str(g) for g in labels])
    unique = sorted(set(labels))
    if len(unique) < 2:
        raise PredictorError(f"leave_one_group_out needs at least two groups, got {unique}.")
    template = probe if probe is not None else MergeProbe()
    names = _record_names(features)
    X = _records_to_matrix(features, names, require_overlap=False)
    cosine = X[:, names.index(cosine_feature)] if cosine_feature in names else None

    pred, lower, mean_base = np.empty_like(y), np.empty_like(y), np.empty_like(y)
    cos_base = np.empty_like(y)
    for group in unique:
        test = labels == group
        train = ~test
        model = clone(template).fit([features[k] for k in np.flatnonzero(train)], y[train])
        held = [features[k] for k in np.flatnonzero(test)]
        pred[test] = model.predict_retention(held)
        lower[test] = model.predict_lower_retention(held)
        mean_base[test] = y[train].mean()
        if cosine is not None:
            ok = train & np.isfinite(cosine)
            cos_base[test] = y[train].mean()
            if ok.sum() >= 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "increasing" chosen on a weak correlation
                    iso = IsotonicRegression(increasing="auto", out_of_bounds="clip").fit(cosine[ok], y[ok])
                have = test & np.isfinite(cosine)
                cos_base[have] = iso.predict(cosine[have])

    per_group = {}
    for group in unique:
        mask = labels == group
        per_group[group] = {"n": int(mask.sum()), **_scores(y[mask], pred[mask])}
    return {
        "n": len(y),
        "n_groups": len(unique),
        **_scores(y, pred),
        "lower_coverage": float(np.mean(y >= lower)),
        "per_group": per_group,
        "predictions": pred.tolist(),
        "lower": lower.tolist(),
        "baselines": {
            "mean": _scores(y, mean_base),
            "update_cosine": _scores(y, cos_base) if cosine is not None else None,
        },
    }
