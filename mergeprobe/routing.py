"""Routing: keep adapters separate and pick one per input sequence (the "route" decision).

:class:`Router` is a logistic regression on the *base* model's hidden states, mean-pooled
over the non-padding tokens of each sequence at one layer (default the last). It is
fitted on each run's probe batch (labelled with the run's name) and predicts, for a new
sequence, the run whose training data it resembles. With a ``PeftModel`` the hidden
states are computed with every adapter disabled, so routing depends on the input only.

:class:`RoutedModel` wraps a ``PeftModel`` holding all the adapters: each batch is
routed, rows are grouped by adapter, each group runs with its adapter active
(``set_adapter``), and the rows are put back in order. Routing is per sequence, not
per token, and costs one extra base-model forward pass per batch.

Routers are saved with skops (allow-listed types only, as for
:class:`~mergeprobe.predictor.MergeProbe`) next to a JSON sidecar holding the run
names, the layer and the hidden size.

Example
-------
>>> from mergeprobe.routing import Router  # doctest: +SKIP
>>> router = Router.fit(peft_model, {"math": (ids_m, mask_m), "code": (ids_c, mask_c)})  # doctest: +SKIP
>>> RoutedModel(peft_model, router).generate(input_ids, attention_mask, max_new_tokens=32)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeprobe.errors import PredictorError
from mergeprobe.predictor import _dump_skops_atomic, _load_skops_trusted

__all__ = ["ROUTER_TRUSTED_TYPES", "RoutedModel", "Router", "pooled_hidden_states", "sidecar_path"]

#: Every type a saved router classifier may contain.
ROUTER_TRUSTED_TYPES: frozenset[str] = frozenset(
    {
        "builtins.bool",
        "builtins.dict",
        "builtins.float",
        "builtins.int",
        "builtins.list",
        "builtins.NoneType",
        "builtins.str",
        "builtins.tuple",
        "numpy.dtype",
        "numpy.float32",
        "numpy.float64",
        "numpy.int32",
        "numpy.int64",
        "numpy.ndarray",
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.pipeline.Pipeline",
        "sklearn.preprocessing._data.StandardScaler",
    }
)
_SIDECAR_FORMAT = "mergeprobe-router"
_SIDECAR_VERSION = 1


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a router file: ``router.skops`` → ``router.skops.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_batch(input_ids: Any, attention_mask: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.dtype.is_floating_point:
        raise PredictorError(
            f"{what}: input_ids must be a non-empty (batch, seq) tensor of token ids, "
            f"got shape {tuple(input_ids.shape)}."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise PredictorError(
            f"{what}: attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}."
        )
    return input_ids, attention_mask


@torch.no_grad()
def pooled_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer: int = -1,
) -> np.ndarray:
    """Mean over non-padding tokens of the base model's hidden states at ``layer``.

    ``layer`` indexes ``output_hidden_states`` (0 is the embeddings, -1 the last layer).
    A ``PeftModel`` runs with its adapters disabled; the model is put in eval mode for
    the pass and restored. Returns a float64 array ``(batch, hidden_size)``.
    """
    input_ids, attention_mask = _check_batch(input_ids, attention_mask, "pooled_hidden_states")
    device = _device(model)
    was_training = model.training
    model.eval()
    disabled = model.disable_adapter() if _is_peft(model) else contextlib.nullcontext()
    try:
        with disabled:
            out = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True
            )
    finally:
        model.train(was_training)
    states = out.hidden_states
    if not -len(states) <= layer < len(states):
        raise PredictorError(
            f"layer {layer} does not exist: the model returns {len(states)} hidden states (0 … {len(states) - 1})."
        )
    hidden = states[layer].float()
    mask = attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return pooled.cpu().double().numpy()


class Router:
    """Pick an adapter per input sequence from the base model's pooled hidden states.

    Build one with :meth:`fit` or :meth:`load`.

    Example
    -------
    >>> router = Router.fit(base_model, {"math": (math_ids, None), "code": (code_ids, None)})  # doctest: +SKIP
    >>> router.predict(base_model, batch["input_ids"], batch["attention_mask"])  # doctest: +SKIP
    ['math', 'code', 'code']

    Parameters
    ----------
    classifier
        A fitted scikit-learn classifier over pooled hidden states whose classes are
        ``0 … len(runs) - 1``.
    runs
        Run (adapter) name of each class.
    layer
        Hidden-state index the features come from.
    hidden_size
        Width of the features, checked at prediction time.
    """

    def __init__(self, classifier: Any, runs: Sequence[str], layer: int, hidden_size: int) -> None:
        self.classifier = classifier
        self.runs = list(runs)
        self.layer = int(layer)
        self.hidden_size = int(hidden_size)

    def __repr__(self) -> str:
        return f"Router(runs={self.runs}, layer={self.layer}, hidden_size={self.hidden_size})"

    @classmethod
    def fit(
        cls,
        model: torch.nn.Module,
        batches: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]],
        layer: int = -1,
        *,
        C: float = 1.0,
    ) -> Router:
        """Fit a router on each run's probe batch.

        Parameters
        ----------
        model
            The base model, or a ``PeftModel`` on it (its adapters are disabled).
        batches
            ``{run name: (input_ids, attention_mask)}``, at least two runs; a mask may be ``None``.
        layer
            Hidden-state index to pool (default the last layer).
        C
            Inverse L2 regularisation of the logistic regression (features are standardised first).
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(batches) < 2:
            raise PredictorError(f"a router needs the probe batches of at least two runs, got {list(batches)}.")
        runs = list(batches)
        features, labels = [], []
        for k, run in enumerate(runs):
            ids, mask = batches[run]
            pooled = pooled_hidden_states(model, ids, mask, layer)
            features.append(pooled)
            labels.append(np.full(len(pooled), k))
        X, y = np.concatenate(features), np.concatenate(labels)
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(X, y)
        return cls(classifier, runs, layer, X.shape[1])

    def predict(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[str]:
        """The run (adapter) name for each sequence of the batch."""
        pooled = pooled_hidden_states(model, input_ids, attention_mask, self.layer)
        if pooled.shape[1] != self.hidden_size:
            raise PredictorError(
                f"this router was fitted on hidden states of width {self.hidden_size}, "
                f"but the model gives {pooled.shape[1]}: use the base model it was fitted with."
            )
        return [self.runs[int(k)] for k in self.classifier.predict(pooled)]

    # -------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the classifier (skops) and its JSON sidecar, each atomically. Returns ``path``."""
        path = Path(path)
        sidecar = {
            "format": _SIDECAR_FORMAT,
            "version": _SIDECAR_VERSION,
            "runs": self.runs,
            "layer": self.layer,
            "hidden_size": self.hidden_size,
        }
        _dump_skops_atomic(self.classifier, path)
        target = sidecar_path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(sidecar, handle, indent=2)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Router:
        """Load a router saved with :meth:`save` (allow-listed types only, never pickle)."""
        path = Path(path)
        side = sidecar_path(path)
        if not side.is_file():
            raise PredictorError(f"router sidecar {str(side)!r} (run names) is missing next to {str(path)!r}.")
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PredictorError(f"router sidecar {str(side)!r} is not valid JSON ({err}).") from err
        if not isinstance(meta, dict) or meta.get("format") != _SIDECAR_FORMAT:
            raise PredictorError(f"{str(side)!r} is not a mergeprobe router sidecar.")
        if meta.get("version") != _SIDECAR_VERSION:
            raise PredictorError(
                f"router sidecar {str(side)!r} has version {meta.get('version')!r}; this mergeprobe reads version "
                f"{_SIDECAR_VERSION}. Refit the router."
            )
        runs = meta.get("runs")
        if not isinstance(runs, list) or len(runs) < 2 or not all(isinstance(r, str) for r in runs):
            raise PredictorError(f"router sidecar {str(side)!r} must list at least two run names.")
        classifier = _load_skops_trusted(path, ROUTER_TRUSTED_TYPES, "router")
        classes = getattr(classifier, "classes_", None)
        if classes is None or list(np.asarray(classes).tolist()) != list(range(len(runs))):
            raise PredictorError(
                f"router {str(path)!r} does not match its sidecar: the classifier's classes are "
                f"{None if classes is None else np.asarray(classes).tolist()}, the sidecar names {len(runs)} runs."
            )
        return cls(classifier, runs, int(meta["layer"]), int(meta["hidden_size"]))


class RoutedModel(torch.nn.Module):
    """A ``PeftModel`` whose every batch row runs with the adapter a :class:`Router` picks.

    Routing is per sequence. Rows routed to the same adapter run together; the
    active adapter and every parameter's ``requires_grad`` are restored afterwards.

    Parameters
    ----------
    peft_model
        A ``PeftModel`` holding every adapter the router names (``load_adapter`` each).
    router
        A fitted :class:`Router`.

    Example
    -------
    >>> peft_model = PeftModel.from_pretrained(base_model, "runs/math", adapter_name="math")  # doctest: +SKIP
    >>> peft_model.load_adapter("runs/code", adapter_name="code")  # doctest: +SKIP
    >>> routed = RoutedModel(peft_model, router)  # doctest: +SKIP
    >>> logits = routed(input_ids=ids, attention_mask=mask).logits  # each row with its own adapter  # doctest: +SKIP
    """

    def __init__(self, peft_model: torch.nn.Module, router: Router) -> None:
        super().__init__()
        if not _is_peft(peft_model):
            raise PredictorError("RoutedModel needs a PeftModel that holds the routed adapters.")
        missing = [run for run in router.runs if run not in peft_model.peft_config]
        if missing:
            raise PredictorError(
                f"the router routes to adapter(s) {missing} that the model does not hold "
                f"(it has {sorted(peft_model.peft_config)}); "
                "load them with peft_model.load_adapter(path, adapter_name=...)."
            )
        self.peft_model = peft_model
        self.router = router

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """The adapter each row of the batch goes to."""
        return self.router.predict(self.peft_model, input_ids, attention_mask)

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        active = self.peft_model.active_adapter
        grads = {name: p.requires_grad for name, p in self.peft_model.named_parameters()}
        try:
            yield
        finally:
            if isinstance(active, str):
                self.peft_model.set_adapter(active)
            for name, p in self.peft_model.named_parameters():
                p.requires_grad_(grads.get(name, p.requires_grad))

    def _groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        routes = self.route(input_ids, attention_mask)
        groups: dict[str, list[int]] = {}
        for row, run in enumerate(routes):
            groups.setdefault(run, []).append(row)
        return {run: torch.tensor(rows, dtype=torch.long) for run, rows in groups.items()}

    @staticmethod
    def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            return value[rows.to(value.device)]
        return value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Run each row with its adapter; same output type as the ``PeftModel``.

        Tensors in ``kwargs`` whose first dimension is the batch (``labels``,
        ``position_ids``) are split with the rows. The output keeps the per-row fields
        (``logits``, and ``hidden_states`` / ``attentions`` when asked for), in input
        order; ``loss`` and ``past_key_values`` are left out because each adapter group
        has its own (compute a loss from the logits; use :meth:`generate` to decode).
        """
        input_ids, attention_mask = _check_batch(input_ids, attention_mask, "RoutedModel")
        batch = input_ids.shape[0]
        merged: dict[str, Any] = {}
        output_type = None
        with self._restoring():
            for run, rows in self._groups(input_ids, attention_mask).items():
                self.peft_model.set_adapter(run)
                sliced = {k: self._rows(v, rows, batch) for k, v in kwargs.items()}
                out = self.peft_model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], **sliced)
                output_type = type(out)
                for key, value in out.items():
                    if key in ("loss", "past_key_values"):
                        continue
                    if isinstance(value, torch.Tensor):
                        target = merged.setdefault(key, value.new_zeros((batch, *value.shape[1:])))
                        target[rows.to(value.device)] = value
                    elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
                        targets = merged.setdefault(key, tuple(v.new_zeros((batch, *v.shape[1:])) for v in value))
                        for target, v in zip(targets, value, strict=True):
                            target[rows.to(v.device)] = v
        return output_type(**merged)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Generate each row with its adapter; returns token ids ``(batch, length)``.

        Groups that stop at different lengths are right-padded with ``pad_token_id``
        (from ``kwargs``, else the generation config's pad, else its EOS, else 0).
        ``return_dict_in_generate`` is not supported.
        """
        if kwargs.get("return_dict_in_generate"):
            raise PredictorError("RoutedModel.generate returns token ids only; drop return_dict_in_generate.")
        input_ids, attention_mask = _check_batch(input_ids, attention_mask, "RoutedModel.generate")
        batch = input_ids.shape[0]
        pad = self._pad_token_id(kwargs)
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        with self._restoring():
            for run, rows in self._groups(input_ids, attention_mask).items():
                self.peft_model.set_adapter(run)
                sliced = {k: self._rows(v, rows, batch) for k, v in kwargs.items()}
                out = self.peft_model.generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows], **sliced)
                pieces.append((rows, out))
        length = max(out.shape[1] for _, out in pieces)
        result = torch.full((batch, length), pad, dtype=pieces[0][1].dtype, device=pieces[0][1].device)
        for rows, out in pieces:
            result[rows.to(out.device), : out.shape[1]] = out
        return result

    def _pad_token_id(self, kwargs: Mapping[str, Any]) -> int:
        if kwargs.get("pad_token_id") is not None:
            return int(kwargs["pad_token_id"])
        config = getattr(self.peft_model, "generation_config", None)
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0
