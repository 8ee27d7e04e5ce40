"""The retention predictor in a child process, beside a training run.

Loading a :class:`~mergeprobe.predictor.MergeProbe` imports scikit-learn and skops:
about 2 s of CPU, nearly all of it Python bytecode holding the interpreter lock. In a
thread of the training process that stalls training for about as long (and on a GPU the
kernel launches wait with it). :class:`PredictorProcess` loads the predictor in a child
process at low priority instead, while the probe window trains, and answers the few
predictions a run asks for (a handful at the window end and at each tracking step) over
a pipe, as JSON lines. The child reads nothing but its own file, writes nothing, and
exits when the pipe closes: when :meth:`PredictorProcess.close` is called, when the
object is collected, or when the training process dies.

Example
-------
>>> from mergeprobe.predictor_process import PredictorProcess
>>> predictor = PredictorProcess("default")  # returns at once; the child loads meanwhile  # doctest: +SKIP
>>> ...  # train  # doctest: +SKIP
>>> predictor.wait_ready()  # doctest: +SKIP
>>> predictor.predict_retention({"update_alignment.mean": 0.4})  # doctest: +SKIP
array([0.83])
>>> predictor.close()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from mergeprobe.errors import PredictorError

__all__ = ["PredictorProcess"]

_METHODS = ("predict_retention", "predict_lower_retention")
_NICENESS = 10
"""How much lower than the training process the child runs (POSIX ``nice``)."""


class PredictorProcess:
    """A :class:`~mergeprobe.predictor.MergeProbe` loaded and queried in a child process.

    Starting returns at once. The first prediction (or :meth:`wait_ready`) waits for the
    load; a load that fails raises :class:`~mergeprobe.errors.PredictorError` with the
    child's reason, as does every call after the child died. It offers the two methods
    the training callback uses, with the same arguments and results as MergeProbe's.

    Parameters
    ----------
    source:
        ``"default"`` for the shipped model, or the path of a model saved with
        :meth:`MergeProbe.save <mergeprobe.predictor.MergeProbe.save>`.
    timeout:
        Seconds to wait for the load or for one answer before giving up on the child
        (a :class:`~mergeprobe.errors.PredictorError`); POSIX only, elsewhere it waits.

    Example
    -------
    >>> with PredictorProcess("my-predictor.skops") as predictor:  # doctest: +SKIP
    ...     low = predictor.predict_lower_retention([{"update_alignment.mean": 0.4}])
    """

    def __init__(self, source: str | os.PathLike[str] = "default", timeout: float = 300.0) -> None:
        self.source = str(source)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ready = False
        self._failure: str | None = None
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        env = dict(os.environ)
        # The child imports this very package (a checkout on sys.path, not only an installed one) and predicts on one
        # thread: OpenMP threads of its own would compete with training's.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = "1"
        try:
            self._process: subprocess.Popen[str] | None = subprocess.Popen(
                [sys.executable, "-m", "mergeprobe.predictor_process", self.source],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=env,
                text=True,
                bufsize=1,
            )
        except OSError as err:
            self._process = None
            self._failure = f"the predictor process could not be started ({err})"
        self._finalizer = weakref.finalize(self, _shut_down, self._process, self._stderr)

    # ------------------------------------------------------------- lifecycle
    def wait_ready(self) -> PredictorProcess:
        """Wait until the child has loaded the model; returns ``self``.

        Raises :class:`~mergeprobe.errors.PredictorError` if the load failed (the
        message is the child's, e.g. the shipped model missing or a type refused).
        """
        with self._lock:
            if not self._ready:
                reply = self._receive()
                if "error" in reply:
                    self._fail(reply["error"])
                self._ready = True
        return self

    @property
    def alive(self) -> bool:
        """Whether the child is running (loading or ready)."""
        return self._process is not None and self._process.poll() is None and self._failure is None

    def close(self) -> None:
        """End the child (closing its pipe; killed if it does not exit within 5 s). Idempotent."""
        self._finalizer()

    def __enter__(self) -> PredictorProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ predicting
    def predict_retention(self, features: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Mean retention for one feature dict or a list of them (as :meth:`MergeProbe.predict_retention`)."""
        return self._call("predict_retention", features)

    def predict_lower_retention(self, features: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Lower bound of retention (as :meth:`MergeProbe.predict_lower_retention`)."""
        return self._call("predict_lower_retention", features)

    def _call(self, method: str, features: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> np.ndarray:
        rows = [features] if isinstance(features, Mapping) else list(features)
        if not rows or not all(isinstance(row, Mapping) for row in rows):
            raise PredictorError(f"{method} takes a feature dict or a non-empty list of feature dicts.")
        self.wait_ready()
        with self._lock:
            self._send({"method": method, "rows": [{str(k): _number(v) for k, v in row.items()} for row in rows]})
            reply = self._receive()
        if "error" in reply:
            # A bad request (e.g. a non-numeric feature) leaves the child serving; say so as MergeProbe would.
            raise (ValueError if reply.get("kind") == "ValueError" else PredictorError)(reply["error"])
        return np.asarray(reply["values"], dtype=np.float64)

    # ------------------------------------------------------------------ pipe
    def _send(self, message: dict[str, Any]) -> None:
        if self._failure is not None or self._process is None or self._process.stdin is None:
            raise PredictorError(self._failure or "the predictor process is closed")
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except (OSError, ValueError) as err:  # a broken pipe, or the pipe closed by close()
            self._fail(f"the predictor process stopped ({err})")

    def _receive(self) -> dict[str, Any]:
        if self._failure is not None or self._process is None or self._process.stdout is None:
            raise PredictorError(self._failure or "the predictor process is closed")
        # One reply per request, so nothing is ever left in the pipe's read buffer: select sees every line.
        if os.name == "posix" and not select.select([self._process.stdout], [], [], self.timeout)[0]:
            self._fail(f"no answer within {self.timeout:g} s")
        try:
            line = self._process.stdout.readline()
        except (OSError, ValueError) as err:
            self._fail(f"the predictor process stopped ({err})")
        if not line:
            self._fail(f"the predictor process exited ({_tail(self._stderr) or 'no message'})")
        try:
            reply = json.loads(line)
        except ValueError:
            self._fail(f"the predictor process sent something that is not a reply: {line[:200]!r}")
        if not isinstance(reply, dict):
            self._fail(f"the predictor process sent something that is not a reply: {line[:200]!r}")
        return reply

    def _fail(self, reason: str) -> None:
        """Remember why the child cannot serve, end it, and raise; later calls raise the same."""
        self._failure = reason
        self.close()
        raise PredictorError(f"retention predictor {self.source!r}: {reason}")


def _number(value: Any) -> float | None:
    """A feature value as JSON carries it (NaN and ±inf included); ``None`` stays missing."""
    return None if value is None else float(value)


def _tail(stream: IO[bytes], limit: int = 2000) -> str:
    """The last lines the child wrote to its error stream (why it died)."""
    try:
        stream.seek(0)
        return stream.read().decode("utf-8", "replace")[-limit:].strip()
    except (OSError, ValueError):
        return ""


def _shut_down(process: subprocess.Popen[str] | None, stderr: IO[bytes]) -> None:
    if process is not None and process.poll() is None:
        try:
            if process.stdin is not None:
                process.stdin.close()  # the child's end-of-input: it exits
            process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stdin) if process is not None else ():
        if stream is not None and not stream.closed:
            try:
                stream.close()
            except OSError:  # unsent bytes of a request to a child that died
                pass
    stderr.close()


# ------------------------------------------------------------------- the child
def _serve(source: str) -> int:
    """Load ``source`` and answer prediction requests, one JSON line each, until end of input."""
    # Only replies go to the protocol stream: anything printed by a library goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if hasattr(os, "nice"):
        try:
            os.nice(_NICENESS)
        except OSError:
            pass

    def reply(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")

    try:
        from mergeprobe.predictor import MergeProbe

        model = MergeProbe.default() if source == "default" else MergeProbe.load(source)
    except PredictorError as err:
        reply({"error": str(err)})
        return 1
    reply({"ready": True})
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request.get("method") not in _METHODS:
                raise PredictorError(f"unknown request {request.get('method')!r}")
            rows = [{k: np.nan if v is None else v for k, v in row.items()} for row in request["rows"]]
            values = getattr(model, request["method"])(rows)
            reply({"values": [float(v) for v in values]})
        except (PredictorError, ValueError, TypeError, KeyError, AttributeError) as err:
            reply({"error": str(err), "kind": "ValueError" if isinstance(err, ValueError) else "PredictorError"})
    return 0


if __name__ == "__main__":
    status = _serve(sys.argv[1])
    sys.stderr.flush()
    # Exit without the interpreter's teardown of scikit-learn and SciPy (about 0.5 s): the parent waits for this exit
    # when training ends, and there is nothing left to write (replies are line-buffered and already sent).
    os._exit(status)
