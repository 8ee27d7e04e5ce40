"""``MergeProbeCallback``: attach mergeprobe to a Hugging Face ``Trainer`` run.

A thin layer over :class:`mergeprobe.probe.ProbeRun` (the probe logic),
:class:`mergeprobe.store.ProbeStore` (the shared store),
:class:`mergeprobe.tracking.MergeabilityLogger` (TensorBoard) and
:func:`mergeprobe.merge_adapters` (merge on end). It maps Trainer events to them:

- ``on_train_begin``: check the model, size the probe window (``probe_fraction`` of
  ``max_steps``, at least ``min_probe_steps``), resume cleanly, start the window.
- ``on_step_end``: end the window when it is over (write the record, compare with the
  other runs, log, decide, maybe stop); afterwards track alignment every
  ``track_every`` steps.
- ``on_train_end``: mark the run finished, save its adapter into the store and, with
  ``merge_on_end``, merge the mergeable set once the last expected run finishes.

Example
-------
>>> from transformers import Trainer
>>> from mergeprobe.callbacks import MergeProbeCallback
>>> trainer = Trainer(model=peft_model, args=args, train_dataset=data,
...                   callbacks=[MergeProbeCallback("probe-store", run_name="math")])  # doctest: +SKIP
>>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from mergeprobe.errors import MergeProbeError, PredictorError, StoreError
from mergeprobe.probe import (
    Comparison,
    ProbeRun,
    base_model_identity,
    require_lora_model,
)


class MergeProbeCallback(TrainerCallback, ExportableState):
    """Capture mergeability signals during a probe window and track them for the whole run.

    Parameters
    ----------
    store:
        Path of the probe store shared by every run (created if missing), or a
        :class:`~mergeprobe.store.ProbeStore`.
    run_name:
        This run's name in the store (default: ``args.run_name``, else the output
        directory's name).
    probe_fraction, min_probe_steps:
        The window is the first ``max(min_probe_steps, ceil(probe_fraction · max_steps))``
        steps, clamped to the run's length.
    probe_steps:
        Window length in steps; required when ``max_steps`` is unknown (iterable
        datasets without ``max_steps``).
    probe_batch, probe_batch_size:
        The inputs used for the representation signals: by default the first
        ``probe_batch_size`` training sequences of this run.
    sketch_dim, sketch_seed:
        Gradient sketch size k and seed; keep them equal across the runs of a store.
    track_every:
        After the window, measure update alignment every this many steps (0: never).
    log_dir, tensorboard:
        TensorBoard directory (default: the Trainer's run directory) and whether to log.
    predictor:
        ``"default"`` (the shipped MergeProbe, if present), a path to a saved one, a
        fitted :class:`~mergeprobe.predictor.MergeProbe`, or ``None``. One named by
        path (or ``"default"``) is loaded in a low-priority child process while the
        window trains (:class:`~mergeprobe.predictor_process.PredictorProcess`), so
        importing scikit-learn does not hold the training process's interpreter; a
        window shorter than the load (about 3 s of CPU) waits for the rest at its end.
        The child ends with training.
    thresholds:
        :class:`~mergeprobe.decision.DecisionThresholds` for the set decision.
    stop_unmergeable:
        Stop training this adapter when the decision routes it away from the set.
    merge_on_end:
        A merge method (``"tada"``, ``"pico"``, …) to merge the mergeable set with when
        the last run finishes; the result goes to ``<store>/merges/<set>/adapter``.
    expected_runs:
        The run names of the set; merge on end waits until all of them finished.
        Without it, each finishing run merges the runs finished so far (idempotent
        per set).
    on_store_error:
        ``"raise"`` (default) or ``"warn"``: on a store failure (read-only, full disk,
        lock timeout, or a full temporary directory while the adapter is staged for the
        store) warn once and let training go on without the probe; the store keeps what
        was written before the failure and nothing half-written.
    overwrite:
        Replace another run's record of the same name.

    Example
    -------
    >>> callback = MergeProbeCallback("probe-store", run_name="math", track_every=100)
    >>> callback.probe_fraction, callback.min_probe_steps, callback.track_every
    (0.03, 8, 100)
    >>> Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
    """

    def __init__(
        self,
        store: Any,
        run_name: str | None = None,
        probe_fraction: float = 0.03,
        min_probe_steps: int = 8,
        probe_steps: int | None = None,
        probe_batch: Any = None,
        probe_batch_size: int = 16,
        sketch_dim: int = 32,
        sketch_seed: int = 0,
        track_every: int = 50,
        log_dir: str | None = None,
        tensorboard: bool = True,
        predictor: Any = "default",
        thresholds: Any = None,
        stop_unmergeable: bool = False,
        merge_on_end: str | None = None,
        expected_runs: Sequence[str] | None = None,
        on_store_error: Literal["raise", "warn"] = "raise",
        overwrite: bool = False,
        adapter_name: str = "default",
    ):
        if not 0.0 < probe_fraction <= 1.0:
            raise ValueError(f"probe_fraction must be in (0, 1], got {probe_fraction}")
        if on_store_error not in ("raise", "warn"):
            raise ValueError(f"on_store_error must be 'raise' or 'warn', got {on_store_error!r}")
        self.store = store
        self.run_name = run_name
        self.probe_fraction = probe_fraction
        self.min_probe_steps = min_probe_steps
        self.probe_steps = probe_steps
        self.probe_batch = probe_batch
        self.probe_batch_size = probe_batch_size
        self.sketch_dim = sketch_dim
        self.sketch_seed = sketch_seed
        self.track_every = track_every
        self.log_dir = log_dir
        self.tensorboard = tensorboard
        self.predictor = predictor
        self.thresholds = thresholds
        self.stop_unmergeable = stop_unmergeable
        self.merge_on_end = merge_on_end
        self.expected_runs = list(expected_runs) if expected_runs is not None else None
        self.on_store_error = on_store_error
        self.overwrite = overwrite
        self.adapter_name = adapter_name
        # State restored on resume (see state()).
        self.window_start: int | None = None
        self.window_end: int | None = None
        self.window_done = False
        self.stop_reason: str | None = None
        self.disabled = False
        self._probe: ProbeRun | None = None
        self._predictor_process: Any = None  # a PredictorProcess started for a predictor named by path
        self._predictor_loading = False  # started, not yet handed to the probe
        self._predictor_deferred = False
        self._logger: Any = None
        self._tracked_step: int | None = None  # the step of the last tracking measurement
        self.decision: Any = None

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Arguments and progress, JSON-safe, for checkpoint resume (``ExportableState``)."""
        args = {
            k: getattr(self, k)
            for k in (
                "run_name", "probe_fraction", "min_probe_steps", "probe_steps", "probe_batch_size", "sketch_dim",
                "sketch_seed", "track_every", "log_dir", "tensorboard", "stop_unmergeable", "merge_on_end",
                "expected_runs", "on_store_error", "overwrite", "adapter_name",
            )
        }
        args["store"] = str(getattr(self.store, "path", self.store))
        attributes = {k: getattr(self, k) for k in ("window_start", "window_end", "window_done", "stop_reason")}
        return {"args": args, "attributes": attributes}

    # ---------------------------------------------------------------- helpers
    def _guard(self, what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a store-touching step; with on_store_error='warn', disable the probe on a storage failure.

        A storage failure is a :class:`StoreError` (the store's own files), or an
        ``OSError`` / ``SafetensorError`` from staging the adapter in the temporary
        directory before it is copied into the store (a full disk there raises those).
        """
        from safetensors import SafetensorError

        try:
            return func(*args, **kwargs)
        except (StoreError, OSError, SafetensorError) as err:
            if self.on_store_error == "raise":
                raise
            cause = str(err) if isinstance(err, StoreError) else f"{type(err).__name__}: {err}"
            warnings.warn(f"mergeprobe: {what} failed ({cause}); training continues without the probe.", stacklevel=2)
            self.disabled = True
            if self._probe is not None:
                self._probe.close()
            self._close_predictor()
            return None

    def _open_store(self) -> Any:
        from mergeprobe.store import ProbeStore

        return self.store if isinstance(self.store, ProbeStore) else ProbeStore(self.store)

    def _start_loading_predictor(self) -> None:
        """Start loading a predictor named by path (or "default") in a child process.

        Loading imports scikit-learn and skops (about 2 s of CPU): in a thread of this
        process it would hold the interpreter lock and stall training as long. The probe
        window trains meanwhile; the first prediction, at the window end, waits for it
        (:meth:`_predictor_ready`).
        """
        if isinstance(self.predictor, str):
            from mergeprobe.predictor_process import PredictorProcess

            self._predictor_process = PredictorProcess(self.predictor)
            self._predictor_loading = True
        elif self._probe is not None:
            self._probe.predictor = self.predictor

    def _no_predictor(self, err: Exception) -> None:
        warnings.warn(f"mergeprobe: no retention predictor ({err}); signals are still captured and logged.", stacklevel=3)
        if self._probe is not None:
            self._probe.predictor = None
        self._close_predictor()

    def _close_predictor(self) -> None:
        if self._predictor_process is not None:
            self._predictor_process.close()
            self._predictor_process = None
        self._predictor_loading = False

    def _store_has_other_runs(self) -> bool:
        """Whether the store holds any run but this one (a predictor has something to predict)."""
        from mergeprobe.store import IncompleteRecordWarning

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IncompleteRecordWarning)  # the probe reports those when it reads them
                return any(name != self.run_name for name in self.store.runs())
        except StoreError:
            return True  # load as usual; the probe reports the store's trouble itself

    def _predictor_ready(self) -> None:
        """Hand the predictor to the probe, once there is another run to predict against.

        A predictor deferred at train begin (the store held no other run) starts loading
        here when one has appeared, and this waits for it; otherwise it waits for the
        background load started at train begin, if that has not finished.
        """
        if self._probe is None:
            return
        if self._predictor_deferred and self._store_has_other_runs():
            self._predictor_deferred = False
            self._start_loading_predictor()
        if self._predictor_loading:
            self._predictor_loading = False
            try:
                self._probe.predictor = self._predictor_process.wait_ready()
            except PredictorError as err:
                self._no_predictor(err)

    def _window_length(self, args: Any, state: Any) -> int:
        if self.probe_steps is not None:
            length = int(self.probe_steps)
        elif state.max_steps and state.max_steps > 0:
            length = max(self.min_probe_steps, math.ceil(self.probe_fraction * state.max_steps))
        else:
            raise MergeProbeError(
                "the number of training steps is unknown (an iterable dataset without max_steps), so the probe window "
                "cannot be a fraction of it: pass probe_steps=N to MergeProbeCallback, or set max_steps in TrainingArguments."
            )
        if state.max_steps and 0 < state.max_steps < length:
            warnings.warn(
                f"mergeprobe: the probe window ({length} steps) is longer than training ({state.max_steps} steps); "
                f"clamping it to {state.max_steps}.",
                stacklevel=2,
            )
            length = int(state.max_steps)
        return length

    # ----------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Before anything slow (store, predictor): the Trainer's TensorBoard directory was made just now.
        began = time.time()
        require_lora_model(model)
        self.run_name = self.run_name or (args.run_name if args.run_name and args.run_name != args.output_dir else None) or Path(args.output_dir).name
        self.run_id = hashlib.sha256(f"{os.path.abspath(args.output_dir)}::{self.run_name}".encode()).hexdigest()[:16]
        length = self._window_length(args, state)
        store = self._guard("opening the probe store", self._open_store)
        if store is None:
            return
        self.store = store
        self._probe = ProbeRun(
            store=store,
            run_name=self.run_name,
            run_id=self.run_id,
            sketch_dim=self.sketch_dim,
            sketch_seed=self.sketch_seed,
            probe_batch_size=self.probe_batch_size,
            probe_batch=self.probe_batch,
            adapter_name=self.adapter_name,
            predictor=None,
            overwrite=self.overwrite,
            is_main=state.is_world_process_zero,
        )
        if state.is_world_process_zero and self.tensorboard:
            from mergeprobe.tracking import MergeabilityLogger, trainer_log_dir

            self._logger = MergeabilityLogger(self.log_dir or trainer_log_dir(args.output_dir, started_at=began))
        step = int(state.global_step)
        resumed_after_window = step > 0 and self._guard("reading this run's record", self._resume_after_window, model, step)
        if not resumed_after_window:  # Fresh start, or a resume inside the window: (re)start the window here.
            self.window_done = False
            self.window_start, self.window_end = step, step + length
            if state.max_steps and state.max_steps > 0:
                self.window_end = min(self.window_end, int(state.max_steps))
            self._probe.begin_window(model, step)
        # Last: the background load would otherwise compete with the work above for the interpreter. The first run of
        # a store has nothing to predict against: it loads the predictor only if another run appears (_predictor_ready).
        if state.is_world_process_zero:
            if isinstance(self.predictor, str) and not self._store_has_other_runs():
                self._predictor_deferred = True
            else:
                self._start_loading_predictor()

    def _resume_after_window(self, model: Any, step: int) -> bool:
        """On resume, reuse this run's stored record instead of recapturing the window."""
        if self.run_name not in self.store.runs():
            return False
        record = self.store.load(self.run_name)
        if record.meta.get("run_id") != self.run_id or record.meta.get("status") not in ("complete", "finished", "stopped"):
            return False
        self._probe.restore(model, record)
        self.window_done = True
        return True

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.disabled or self._probe is None:
            return
        step = int(state.global_step)
        if not self.window_done and self.window_end is not None and step >= self.window_end:
            self._end_window(model, step, state, control)
        elif self.window_done and self.track_every and step % self.track_every == 0 and state.is_world_process_zero:
            self._predictor_ready()
            tracked = self._guard("tracking", self._probe.track, model, step)
            self._tracked_step = step
            if tracked:
                self._log_comparisons(tracked, step, images=False)
                self._apply_decision(tracked, step, control)

    def _end_window(self, model: Any, step: int, state: Any, control: Any) -> None:
        self.window_done = True
        self._predictor_ready()
        meta = {"max_steps": int(state.max_steps or 0)}
        comparisons = self._guard("writing the probe record", self._probe.end_window, model, step, meta)
        if not state.is_world_process_zero or comparisons is None:
            return
        if self._logger is not None:
            self._logger.scalars(
                {
                    "disturbance": float(self._probe.signals.disturbance.mean()),
                    "relative_change": float(self._probe.signals.relative_change.mean()),
                },
                step,
            )
        self._log_comparisons(comparisons, step, images=True)
        self._apply_decision(comparisons, step, control)
        if self._logger is not None:
            self._logger.flush()

    def _apply_decision(self, comparisons: dict[str, Comparison], step: int, control: Any) -> None:
        """Decide for the set, log the decision, and stop this run if it is routed away."""
        from mergeprobe.tracking import decision_markdown

        self.decision = self._decide(comparisons)
        if self.decision is None:
            return
        if self._logger is not None:
            self._logger.text("decision", decision_markdown(self.decision), step)
        if self.stop_unmergeable and self.run_name in self.decision.routed and not self.stop_reason:
            self.stop_reason = "; ".join(self.decision.reasons)
            control.should_training_stop = True
            self._guard(
                "recording the stop", self.store.update_status, self.run_name, "stopped",
                stop_reason=self.stop_reason, stopped_at_step=step,
            )

    def _decide(self, comparisons: dict[str, Comparison]) -> Any:
        """The set decision over this run and the runs it was compared with (needs a predictor)."""
        if self._probe.predictor is None or not comparisons:
            return None
        from mergeprobe.probe import decide_for_store

        try:
            return decide_for_store(self.store, [self.run_name, *comparisons], self._probe.predictor, self.thresholds)
        except PredictorError as err:  # e.g. the predictor process died
            self._no_predictor(err)
            return None

    def _log_comparisons(self, comparisons: dict[str, Comparison], step: int, images: bool) -> None:
        if self._logger is None:
            return
        for name, comparison in comparisons.items():
            features = comparison.features
            values = {
                f"update_alignment/{name}": features.get("update_alignment.global", features.get("update_alignment.mean", float("nan"))),
                f"gradient_alignment/{name}": features.get("gradient_alignment.mean", float("nan")),
                f"cross_disturbance/{name}": features.get("cross_disturbance.mean", float("nan")),
            }
            if comparison.predicted_retention is not None:
                values[f"predicted_retention/{name}"] = comparison.predicted_retention
            self._logger.scalars(values, step)
            if images and comparison.profile is not None:
                layers, kinds, matrix = comparison.profile
                self._logger.heatmap(f"depth_profile/{name}", matrix.numpy(), layers, kinds, step, title=f"update alignment: {self.run_name} vs {name}")
        self._logger.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.disabled or self._probe is None:
            self._close_predictor()
            return
        if not self.window_done:  # training ended inside the window
            self._end_window(model, int(state.global_step), state, control)
        if state.is_world_process_zero and not self.disabled:
            self._predictor_ready()
            # The last measurement, unless on_step_end just took it at this very step (nothing trained since).
            if self._tracked_step != int(state.global_step):
                tracked = self._guard("tracking", self._probe.track, model, int(state.global_step))
                if tracked:
                    self._log_comparisons(tracked, int(state.global_step), images=False)
            status = "stopped" if self.stop_reason else "finished"
            extra = {"stop_reason": self.stop_reason} if self.stop_reason else {}
            self._guard("saving the final adapter", self._probe.save_final_adapter, model, status, **extra)
            if self.merge_on_end and not self.disabled:
                self._guard("merging on end", self._merge_on_end, model)
        self._probe.close()
        self._close_predictor()
        if self._logger is not None:
            self._logger.close()

    def _merge_on_end(self, model: Any) -> None:
        from mergeprobe.probe import merge_finished_runs

        merge_finished_runs(
            self.store,
            method=self.merge_on_end,
            expected_runs=self.expected_runs,
            decision=self.decision,
            model=model,
            base_fingerprint=base_model_identity(model)["fingerprint"],
        )
