"""The probe store: one directory shared by every training run that MergeProbe watches.

Runs write their early-training signals here (sequentially or concurrently, from
several processes or machines sharing the directory), and the predictor, the merge
decision and the CLI read them back. Every write is atomic — written under a
temporary name, flushed to disk, then renamed into place — so a reader sees a record
either whole or not at all, and a writer killed half-way leaves only a temporary
entry that readers skip with a warning and the next write of that run cleans up.

Layout
------
::

    <store>/
      store.json                   format, schema_version, created_by, created, host
      runs/<run_name>/
        meta.json                  RunRecord.meta (JSON), including "write_id"
        signals.safetensors        RunRecord.tensors; header metadata repeats "write_id"
        adapter/                   optional window-end PEFT adapter
        cache.safetensors          optional tensors that can be recomputed (the run's own hidden
                                   states on its probe batch); header metadata "write_id" equals
                                   meta.json's "cache_id". Missing or stale: recomputed, never an error
      runs/.<run_name>.tmp-<hex>/  a write in progress (or killed): never read
      runs/.<run_name>.old-<hex>/  the previous version during an overwrite
      outcomes/<id>.json           measured retention after a real merge
      pairs/<a>+<b>.json           features of the ordered pair (a, b), written by a's probe
      merges/<set_id>/
        CLAIM                      created with O_CREAT|O_EXCL by the one process that merges
        result.json                written by mark_merged
        ...                        whatever the merging process saves (merged adapter)
      locks/
        _store.lock                store-wide, held only for renames
        _run.<run_name>.lock       held while one run's record is written
        <name>.lock                caller locks (ProbeStore.lock)

Records hold signals as an opaque ``dict[str, Tensor]`` plus JSON metadata; the
store never interprets them (:meth:`ProbeStore.write_signals` and
:meth:`ProbeStore.load_signals` convert to and from ``RunSignals``). Nothing is ever
pickled: metadata is JSON and tensors are safetensors.

Example
-------
>>> import torch
>>> from mergeprobe.store import ProbeStore
>>> store = ProbeStore("probe-store")  # doctest: +SKIP
>>> store.write_record("math", {"base_model": "Qwen/Qwen2.5-0.5B", "run_id": "a1"},
...                    {"update.q_proj.A": torch.zeros(4, 8)})  # doctest: +SKIP
>>> store.runs(status="probing")  # doctest: +SKIP
['math']
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock

from mergeprobe.errors import SchemaVersionError, StoreError

if TYPE_CHECKING:
    from torch import Tensor

    from mergeprobe.signals import RunSignals

SCHEMA_VERSION = 1
"""The layout version this mergeprobe reads and writes (``store.json`` and every record)."""

STATUSES = ("probing", "complete", "stopped", "finished")
"""Run statuses: probe window in progress; window captured; training stopped early; training finished."""

STORE_FILE = "store.json"
META_FILE = "meta.json"
SIGNALS_FILE = "signals.safetensors"
CACHE_FILE = "cache.safetensors"
ADAPTER_DIR = "adapter"
CLAIM_FILE = "CLAIM"
RESULT_FILE = "result.json"
STORE_FORMAT = "mergeprobe-probe-store"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAX_NAME = 200
_MAX_HEADER = 100 * 1024 * 1024
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]+$")


class IncompleteRecordWarning(UserWarning):
    """A reader skipped a run record, outcome or merge result that is incomplete or unreadable."""


def check_name(name: str, what: str = "run name") -> str:
    """Return ``name`` if it is safe as one path component of the store, else raise.

    Allowed: letters, digits, ``_``, ``-`` and ``.``, starting with a letter or digit,
    at most 200 characters, no ``..``.

    >>> check_name("math-r8_seed.1")
    'math-r8_seed.1'
    """
    if not _is_safe_name(name):
        raise StoreError(
            f"{what} {name!r} is not a safe store name: use letters, digits, '_', '-' and '.', starting with a "
            f"letter or digit, at most {_MAX_NAME} characters, no '..' and no path separators "
            "(e.g. replace '/' with '-')."
        )
    return name


def _is_safe_name(name: object) -> bool:
    # fullmatch, not match: "$" also matches before a trailing newline.
    return isinstance(name, str) and 0 < len(name) <= _MAX_NAME and ".." not in name and _NAME.fullmatch(name) is not None


def merge_set_id(run_names: Iterable[str]) -> str:
    """A deterministic id for a set of runs, the same in every process (order and duplicates ignored).

    >>> merge_set_id(["math", "code"]) == merge_set_id(["code", "math", "math"])
    True
    """
    names = sorted({check_name(name) for name in run_names})
    if not names:
        raise StoreError("a merge set needs at least one run name.")
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return f"set-{digest}"


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    A reader sees the old content or the new one, never a mixture; a crash leaves at
    most a hidden ``.<name>.tmp-<hex>`` file beside it. Raises ``OSError`` as the
    operating system reports it (the store wraps it into :class:`StoreError`).

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.json"
    >>> atomic_write_text(target, "{}").read_text()
    '{}'
    """
    return _atomic_write_bytes(Path(path), text.encode(encoding))


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    # os.open with 0o666 honours the umask, so files stay readable by the other users of a shared store.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (files are never modified in place here), copying where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a directory into a new one whose modes follow the umask, as the store's own files do.

    Not ``shutil.copytree``: it copies modes too, and the adapter comes from a
    temporary directory (mode 0700), which would leave it unreadable to the other users
    of a shared store.
    """
    os.mkdir(target, 0o777)
    for item in source.iterdir():
        if item.is_dir():
            _copy_tree(item, target / item.name)
        else:
            shutil.copyfile(item, target / item.name)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; not every platform or file system can fsync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _json_text(value: Any, what: str) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} is not JSON-safe ({err}); pass only str, numbers, bools, None, lists and dicts.") from err


def _os_hint(err: OSError) -> str:
    code = err.errno
    if code == errno.EROFS:
        return "the file system is read-only; point the probe store at a writable directory."
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied; make the store directory writable for this user or use another store path."
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "the disk is full (or the quota is exceeded); free some space or move the probe store."
    return "check that the store directory exists, is reachable and is writable."


class _Unreadable(Exception):
    """A record, outcome or result file that cannot be read; the message says why."""


@dataclass
class RunRecord:
    """One run's probe record: JSON metadata and signal tensors.

    ``meta`` keys written by the store: ``run_name``, ``run_id`` (who owns the name),
    ``status`` (one of :data:`STATUSES`), ``schema_version``, ``created``, ``updated``
    (ISO 8601 UTC), ``host``, ``pid``, ``write_id`` and ``extra`` (free-form dict).
    Keys written by callers by convention: ``base_model`` (a name/path string or a dict
    with ``name_or_path``), ``target_modules``, ``ranks``, ``probe_steps`` and
    ``signals`` (``RunSignals.meta()``).

    Example
    -------
    >>> record = RunRecord("math", {"status": "complete", "base_model": "gpt2"}, {})
    >>> record.status, record.base_model
    ('complete', 'gpt2')
    """

    run_name: str
    meta: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    path: Path | None = None

    @property
    def run_id(self) -> str | None:
        """The identity of the run that owns this record."""
        return self.meta.get("run_id")

    @property
    def status(self) -> str | None:
        """``probing``, ``complete``, ``stopped`` or ``finished``."""
        return self.meta.get("status")

    @property
    def base_model(self) -> Any:
        """The base model identity as recorded (a string, or a dict with ``name_or_path``)."""
        return self.meta.get("base_model")

    @property
    def target_modules(self) -> list[str] | None:
        """The LoRA target modules, if recorded."""
        return self.meta.get("target_modules")

    @property
    def ranks(self) -> Any:
        """The LoRA rank(s), if recorded (an int or a module → rank dict)."""
        return self.meta.get("ranks")

    @property
    def probe_steps(self) -> Any:
        """The probe window, if recorded (steps, or a ``[start, end]`` pair)."""
        return self.meta.get("probe_steps")

    @property
    def created(self) -> str | None:
        """When the run first wrote this record (ISO 8601 UTC)."""
        return self.meta.get("created")

    @property
    def updated(self) -> str | None:
        """When the record was last written or its status changed (ISO 8601 UTC)."""
        return self.meta.get("updated")

    @property
    def host(self) -> str | None:
        """The host name of the last writer."""
        return self.meta.get("host")

    @property
    def pid(self) -> int | None:
        """The process id of the last writer."""
        return self.meta.get("pid")

    @property
    def extra(self) -> dict[str, Any]:
        """Free-form caller data."""
        return self.meta.get("extra") or {}

    @property
    def adapter_path(self) -> Path | None:
        """The window-end adapter directory stored with the record, if any."""
        if self.path is None or not (self.path / ADAPTER_DIR).is_dir():
            return None
        return self.path / ADAPTER_DIR


def _serialize_tensors(tensors: Mapping[str, Tensor], write_id: str) -> bytes:
    import torch
    from safetensors.torch import save

    if not isinstance(tensors, Mapping):
        raise StoreError(f"tensors must be a dict of name → torch.Tensor, got {type(tensors).__name__}.")
    flat: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise StoreError(f"tensor name {key!r} must be a non-empty string.")
        if not isinstance(value, torch.Tensor):
            raise StoreError(f"tensors[{key!r}] is a {type(value).__name__}, not a torch.Tensor; store numbers in meta instead.")
        flat[key] = value.detach().to("cpu").contiguous().clone()
    return save(flat, metadata={"format": "pt", "producer": "mergeprobe", "write_id": write_id})


def _safetensors_metadata(head: bytes, size: int) -> dict[str, str]:
    """Check a safetensors header against the file size; return its ``__metadata__``."""
    if size < 8 or len(head) < 8:
        raise _Unreadable(f"{SIGNALS_FILE} is truncated ({size} bytes)")
    length = int.from_bytes(head[:8], "little")
    if length > _MAX_HEADER or 8 + length > size or len(head) < 8 + length:
        raise _Unreadable(f"{SIGNALS_FILE} is truncated (header of {length} bytes in a {size}-byte file)")
    try:
        header = json.loads(head[8 : 8 + length])
        metadata = header.pop("__metadata__", None) or {}
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as err:
        raise _Unreadable(f"{SIGNALS_FILE} has a corrupt header ({err})") from err
    if 8 + length + end != size:
        raise _Unreadable(f"{SIGNALS_FILE} is truncated or padded ({size} bytes, header says {8 + length + end})")
    if not isinstance(metadata, dict):
        raise _Unreadable(f"{SIGNALS_FILE} has a corrupt header (__metadata__ is not an object)")
    return metadata


class ProbeStore:
    """A probe store directory, created on first use and shared by all runs.

    Parameters
    ----------
    path:
        The store directory (created with its parents when ``create`` is true).
    create:
        Create the store if ``store.json`` is missing; with ``False`` a missing store
        raises :class:`StoreError`.
    lock_timeout:
        Seconds to wait for a run's or the store-wide lock before raising.

    Raises
    ------
    SchemaVersionError
        If the store was written with another :data:`SCHEMA_VERSION`.
    StoreError
        If the directory cannot be created or read.

    Example
    -------
    >>> store = ProbeStore("/shared/probe-store")  # doctest: +SKIP
    >>> store.runs(status="complete", base_model="Qwen/Qwen2.5-0.5B")  # doctest: +SKIP
    ['code', 'math']
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True, lock_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.lock_timeout = float(lock_timeout)
        self._runs = self.path / "runs"
        self._outcomes = self.path / "outcomes"
        self._merges = self.path / "merges"
        self._locks = self.path / "locks"
        self.info = self._open(create)

    def __repr__(self) -> str:
        return f"ProbeStore({str(self.path)!r})"

    # ----------------------------------------------------------------- opening

    def _open(self, create: bool) -> dict[str, Any]:
        store_file = self.path / STORE_FILE
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"probe store {str(self.path)!r} is not a directory; point the store at a directory.")
        if not store_file.exists():
            if not create:
                raise StoreError(
                    f"{str(self.path)!r} is not a probe store (no {STORE_FILE}); check the path, or open it with create=True."
                )
            self._make_folders()
            with self._locked(self._locks / "_store.lock", "the store"):
                if not store_file.exists():
                    from mergeprobe import __version__

                    info = {
                        "format": STORE_FORMAT,
                        "schema_version": SCHEMA_VERSION,
                        "created_by": f"mergeprobe {__version__}",
                        "created": _now(),
                        "host": socket.gethostname(),
                    }
                    with self._os_errors("write", store_file):
                        atomic_write_text(store_file, _json_text(info, "store info"))
        try:
            info = json.loads(store_file.read_text(encoding="utf-8"))
        except OSError as err:
            raise self._store_error("read", store_file, err) from err
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise StoreError(
                f"probe store {str(self.path)!r}: {STORE_FILE} is not valid JSON ({err}); "
                f"if no run has used this store yet, delete {str(store_file)!r} to re-create it."
            ) from err
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise StoreError(
                f"{str(store_file)!r} is not a mergeprobe probe-store file (format {info.get('format') if isinstance(info, dict) else None!r}); "
                "point the store at another directory."
            )
        version = info.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"probe store {str(self.path)!r} has schema version {version!r} (written by {info.get('created_by', 'an unknown version')}), "
                f"but this mergeprobe reads schema version {SCHEMA_VERSION}. Use the mergeprobe version that wrote it, "
                "or point this run at a new store directory."
            )
        if create:
            self._make_folders()
        return info

    def _make_folders(self) -> None:
        for folder in (self._runs, self._outcomes, self._merges, self._locks):
            if not folder.is_dir():
                with self._os_errors("create", folder):
                    folder.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- errors and locks

    def _store_error(self, action: str, path: Path, err: OSError) -> StoreError:
        cause = err.strerror or str(err)
        name = errno.errorcode.get(err.errno, "") if err.errno else ""
        return StoreError(
            f"probe store {str(self.path)!r}: cannot {action} {str(path)!r}: {cause}{f' [{name}]' if name else ''}; {_os_hint(err)}"
        )

    @contextmanager
    def _os_errors(self, action: str, path: Path) -> Iterator[None]:
        try:
            yield
        except filelock.Timeout:
            raise
        except OSError as err:
            raise self._store_error(action, path, err) from err

    @contextmanager
    def _locked(self, lock_file: Path, what: str, timeout: float | None = None) -> Iterator[None]:
        wait = self.lock_timeout if timeout is None else timeout
        lock = filelock.FileLock(str(lock_file), timeout=wait)
        try:
            lock.acquire()
        except filelock.Timeout as err:
            raise StoreError(
                f"probe store {str(self.path)!r}: timed out after {wait:g} s waiting for the lock on {what} ({str(lock_file)!r}); "
                "another process holds it. Wait and retry, or, if no mergeprobe process is running, delete that lock file."
            ) from err
        except OSError as err:
            raise self._store_error("take the lock", lock_file, err) from err
        try:
            yield
        finally:
            lock.release()

    def _run_lock(self, run_name: str) -> Path:
        return self._locks / f"_run.{run_name}.lock"

    @contextmanager
    def lock(self, name: str, timeout: float = 60.0) -> Iterator[Path]:
        """Hold the store lock ``locks/<name>.lock`` (an inter-process ``filelock.FileLock``).

        Yields the lock file's path. Raises :class:`StoreError` naming the lock file
        when it cannot be taken within ``timeout`` seconds.

        Example
        -------
        >>> with store.lock("predictor-refit", timeout=30):  # doctest: +SKIP
        ...     refit_predictor(store)
        """
        lock_file = self._locks / f"{check_name(name, 'lock name')}.lock"
        with self._locked(lock_file, f"{name!r}", timeout):
            yield lock_file

    # ----------------------------------------------------------------- writing records

    def write_record(
        self,
        run_name: str,
        meta: Mapping[str, Any],
        tensors: Mapping[str, Tensor],
        overwrite: bool = False,
        adapter: str | os.PathLike[str] | None = None,
        cache: Mapping[str, Tensor] | None = None,
        keep_cache: bool = False,
    ) -> RunRecord:
        """Write (or rewrite) one run's record atomically.

        The record is written into a temporary directory inside ``runs/``, flushed,
        and renamed into place under the run's lock (and, for the rename only, the
        store-wide lock). ``meta["run_id"]`` identifies the run (a fresh id is drawn if
        absent): a record with the same ``run_id`` is replaced (a resumed run rewrites
        its own record, keeping ``created``); a complete record of another run is
        refused unless ``overwrite=True``.

        Parameters
        ----------
        run_name:
            The record's name (see :func:`check_name`).
        meta:
            JSON-safe metadata; ``status`` defaults to ``"probing"``.
        tensors:
            Flat ``name → Tensor`` dict (stored as safetensors, on CPU).
        overwrite:
            Replace a record that belongs to another run.
        adapter:
            A PEFT adapter directory to store as the record's ``adapter/``.
        cache:
            Tensors a reader could recompute but would rather not (the probe stores the
            run's own hidden states here), written as the record's ``cache.safetensors``
            and read back by :meth:`load_cache`. ``meta["cache_id"]`` ties them to this write.
        keep_cache:
            Without ``cache``: carry the existing record's cache over (a run rewriting its
            own record, e.g. with the final adapter, whose cached tensors still hold).

        Returns
        -------
        RunRecord
            The record as stored (``meta`` completed by the store).

        Example
        -------
        >>> record = store.write_record("math", {"run_id": "a1", "base_model": "gpt2"},
        ...                             {"sketch.q_proj": torch.zeros(32, 32)})  # doctest: +SKIP
        >>> record.status  # doctest: +SKIP
        'probing'
        """
        name = check_name(run_name)
        write_id = uuid.uuid4().hex
        record_meta = self._prepare_meta(name, meta, write_id)
        record_meta.pop("cache_id", None)
        blob = _serialize_tensors(tensors, write_id)
        cache_blob = None
        if cache is not None:
            record_meta["cache_id"] = uuid.uuid4().hex
            cache_blob = _serialize_tensors(cache, record_meta["cache_id"])
        adapter_source = Path(adapter) if adapter is not None else None
        if adapter_source is not None and not adapter_source.is_dir():
            raise StoreError(f"adapter {str(adapter_source)!r} is not a directory; pass a saved PEFT adapter directory.")
        target = self._runs / name
        with self._locked(self._run_lock(name), f"run {name!r}"):
            self._recover_interrupted(name)
            previous = self._previous_owner(name, record_meta["run_id"], overwrite)
            same_run = previous is not None and previous.get("run_id") == record_meta["run_id"]
            if same_run and previous.get("created"):
                record_meta["created"] = previous["created"]
            carried = None
            if cache is None and keep_cache and same_run and isinstance(previous.get("cache_id"), str) and (target / CACHE_FILE).is_file():
                carried = target / CACHE_FILE
                record_meta["cache_id"] = previous["cache_id"]
            tmp = self._runs / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with self._os_errors(f"write run {name!r} into", tmp):
                    os.mkdir(tmp, 0o777)
                    _write_new_file(tmp / SIGNALS_FILE, blob)
                    if cache_blob is not None:
                        _write_new_file(tmp / CACHE_FILE, cache_blob)
                    elif carried is not None:
                        _link_or_copy(carried, tmp / CACHE_FILE)
                    _write_new_file(tmp / META_FILE, _json_text(record_meta, "meta").encode())
                    if adapter_source is not None:
                        _copy_tree(adapter_source, tmp / ADAPTER_DIR)
                    _fsync_dir(tmp)
                self._swap_into_place(tmp, target, name)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return RunRecord(name, record_meta, dict(tensors), target)

    def _prepare_meta(self, name: str, meta: Mapping[str, Any], write_id: str) -> dict[str, Any]:
        if not isinstance(meta, Mapping):
            raise StoreError(f"meta for run {name!r} must be a dict, got {type(meta).__name__}.")
        record = json.loads(_json_text(dict(meta), f"meta for run {name!r}"))
        run_id = record.get("run_id") or uuid.uuid4().hex
        if not isinstance(run_id, str):
            raise StoreError(f"meta['run_id'] for run {name!r} must be a string, got {run_id!r}.")
        status = record.get("status", "probing")
        if status not in STATUSES:
            raise StoreError(f"status {status!r} for run {name!r} is not one of {', '.join(STATUSES)}.")
        extra = record.get("extra", {})
        if not isinstance(extra, dict):
            raise StoreError(f"meta['extra'] for run {name!r} must be a dict, got {type(extra).__name__}.")
        now = _now()
        record.update(
            run_name=name,
            run_id=run_id,
            status=status,
            extra=extra,
            schema_version=SCHEMA_VERSION,
            created=now,
            updated=now,
            host=socket.gethostname(),
            pid=os.getpid(),
            write_id=write_id,
        )
        return record

    def _previous_owner(self, name: str, run_id: str, overwrite: bool) -> dict[str, Any] | None:
        """The existing record's meta (None if absent or unreadable); refuse another run's record."""
        target = self._runs / name
        if not target.exists():
            return None
        try:
            previous, _ = self._read_record(target, name, load_tensors=False)
        except SchemaVersionError as err:
            if overwrite:
                return None
            raise StoreError(f"{err} Pass overwrite=True to replace record {name!r}, or choose another run_name.") from err
        except _Unreadable as reason:
            warnings.warn(
                f"probe store {str(self.path)!r}: replacing incomplete record {name!r} ({reason}).",
                IncompleteRecordWarning,
                stacklevel=4,
            )
            return None
        if previous.get("run_id") != run_id and not overwrite:
            raise StoreError(
                f"probe store {str(self.path)!r}: run name {name!r} already holds the record of another run "
                f"(run_id {previous.get('run_id')!r}, status {previous.get('status')!r}, written {previous.get('updated')} "
                f"on {previous.get('host')}); this run's run_id is {run_id!r}. Choose another run_name for this run, "
                "or pass overwrite=True to replace that record."
            )
        return previous

    def _swap_into_place(self, tmp: Path, target: Path, name: str) -> None:
        """Rename ``tmp`` to ``target`` under the store lock, replacing any existing record."""
        old: Path | None = None
        with self._locked(self._locks / "_store.lock", "the store"):
            with self._os_errors(f"rename run {name!r} into", target):
                if target.exists():
                    old = self._runs / f".{name}.old-{uuid.uuid4().hex[:12]}"
                    os.replace(target, old)
                    try:
                        os.replace(tmp, target)
                    except BaseException:
                        os.replace(old, target)
                        raise
                else:
                    os.replace(tmp, target)
                _fsync_dir(self._runs)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _recover_interrupted(self, name: str) -> None:
        """Under the run's lock: restore a record a killed overwrite left aside, drop stale temp dirs."""
        with self._os_errors(f"clean up interrupted writes of run {name!r} in", self._runs):
            leftovers = [p for p in self._runs.iterdir() if (m := _TEMP.fullmatch(p.name)) and m["name"] == name]
            if not (self._runs / name).exists():
                olds = [p for p in leftovers if p.name.startswith(f".{name}.old-")]
                if olds:
                    newest = max(olds, key=lambda p: p.stat().st_mtime)
                    with self._locked(self._locks / "_store.lock", "the store"):
                        os.replace(newest, self._runs / name)
                    leftovers.remove(newest)
            for path in leftovers:
                shutil.rmtree(path, ignore_errors=True)

    def update_status(self, run_name: str, status: str, **extra: Any) -> dict[str, Any]:
        """Set a record's status (and merge ``extra`` into ``meta["extra"]``), rewriting meta.json only.

        Returns the new metadata. The tensors are untouched.

        Example
        -------
        >>> store.update_status("math", "finished", final_loss=0.41)  # doctest: +SKIP
        """
        name = check_name(run_name)
        if status not in STATUSES:
            raise StoreError(f"status {status!r} for run {name!r} is not one of {', '.join(STATUSES)}.")
        with self._locked(self._run_lock(name), f"run {name!r}"):
            try:
                meta, _ = self._read_record(self._runs / name, name, load_tensors=False)
            except _Unreadable as reason:
                raise self._unreadable_error(name, str(reason)) from None
            meta["status"] = status
            meta["extra"] = {**(meta.get("extra") or {}), **json.loads(_json_text(extra, f"extra for run {name!r}"))}
            meta["updated"] = _now()
            meta["host"] = socket.gethostname()
            meta["pid"] = os.getpid()
            meta_file = self._runs / name / META_FILE
            with self._os_errors("write", meta_file):
                atomic_write_text(meta_file, _json_text(meta, "meta"))
        return meta

    def write_signals(
        self,
        run_name: str,
        signals: RunSignals,
        meta: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        adapter: str | os.PathLike[str] | None = None,
    ) -> RunRecord:
        """Write a ``RunSignals`` as a record: ``signals.to_tensors()`` and ``meta["signals"] = signals.meta()``.

        Example
        -------
        >>> store.write_signals("math", signals, {"run_id": run_id, "status": "complete"})  # doctest: +SKIP
        """
        record_meta = {**dict(meta or {}), "signals": signals.meta()}
        return self.write_record(run_name, record_meta, signals.to_tensors(), overwrite=overwrite, adapter=adapter)

    # ----------------------------------------------------------------- reading records

    def _read_record(self, folder: Path, name: str, load_tensors: bool) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        """Read and check one record; raise _Unreadable or SchemaVersionError."""
        try:
            meta_text = (folder / META_FILE).read_bytes()
        except FileNotFoundError:
            if not folder.exists():
                raise _Unreadable("no such record") from None
            raise _Unreadable(f"{META_FILE} is missing") from None
        except OSError as err:
            raise _Unreadable(f"cannot read {META_FILE} ({err})") from err
        try:
            meta = json.loads(meta_text)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise _Unreadable(f"{META_FILE} is not valid JSON, probably truncated ({err})") from err
        if not isinstance(meta, dict):
            raise _Unreadable(f"{META_FILE} is not a JSON object")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            if isinstance(version, int) and not isinstance(version, bool):
                raise SchemaVersionError(
                    f"probe store {str(self.path)!r}: record {name!r} has schema version {version}, but this mergeprobe "
                    f"reads schema version {SCHEMA_VERSION}; read it with the mergeprobe version that wrote it, or rewrite the record."
                )
            raise _Unreadable(f"{META_FILE} has no valid schema_version ({version!r})")
        if meta.get("status") not in STATUSES:
            raise _Unreadable(f"{META_FILE} has an invalid status {meta.get('status')!r}")
        if not isinstance(meta.get("write_id"), str):
            raise _Unreadable(f"{META_FILE} has no write_id")
        signals_file = folder / SIGNALS_FILE
        try:
            if load_tensors:
                data = signals_file.read_bytes()
                size, head = len(data), data
            else:
                with open(signals_file, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    head = handle.read(8)
                    if len(head) == 8:
                        head += handle.read(min(int.from_bytes(head, "little"), _MAX_HEADER))
        except FileNotFoundError:
            raise _Unreadable(f"{SIGNALS_FILE} is missing") from None
        except OSError as err:
            raise _Unreadable(f"cannot read {SIGNALS_FILE} ({err})") from err
        metadata = _safetensors_metadata(head, size)
        if metadata.get("write_id") != meta["write_id"]:
            raise _Unreadable(f"{META_FILE} and {SIGNALS_FILE} come from different writes")
        if not load_tensors:
            return meta, None
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as err:  # safetensors raises SafetensorError, and torch errors for bad dtypes
            raise _Unreadable(f"{SIGNALS_FILE} cannot be decoded ({err})") from err
        return meta, tensors

    def _unreadable_error(self, name: str, reason: str) -> StoreError:
        if reason == "no such record":
            try:
                names = sorted(p.name for p in _entries(self._runs) if not p.name.startswith("."))
                known = ", ".join(names[:20]) + (", …" if len(names) > 20 else "") or "none"
            except OSError:
                known = "cannot be listed"
            return StoreError(f"probe store {str(self.path)!r} has no run record {name!r} (runs: {known}).")
        return StoreError(
            f"probe store {str(self.path)!r}: run record {name!r} is incomplete: {reason}. A writer was probably killed "
            f"mid-write; rerun that run's probe (its next write replaces the record) or delete {str(self._runs / name)!r}."
        )

    def load(self, run_name: str) -> RunRecord:
        """Load one run's record (metadata and tensors).

        Raises :class:`StoreError` if the record does not exist or is incomplete, and
        :class:`SchemaVersionError` if it was written with another schema version.

        Example
        -------
        >>> record = store.load("math")  # doctest: +SKIP
        >>> record.status, sorted(record.tensors)[:1]  # doctest: +SKIP
        ('complete', ['grad.q_proj'])
        """
        name = check_name(run_name)
        folder = self._runs / name
        try:
            meta, tensors = self._read_settled(folder, name, load_tensors=True)
        except _Unreadable as reason:
            raise self._unreadable_error(name, str(reason)) from None
        return RunRecord(name, meta, tensors or {}, folder)

    def _read_settled(self, folder: Path, name: str, load_tensors: bool) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        """:meth:`_read_record`, read once more under the store lock if the first read finds the record incomplete.

        An overwrite swaps two directories under the store lock, so a reader that looks
        between (or across) the two renames sees no record, or meta.json and
        signals.safetensors of different writes; holding the lock once gives a settled
        view. If the lock cannot be taken (a read-only store, a timeout) the first answer stands.
        """
        try:
            return self._read_record(folder, name, load_tensors)
        except _Unreadable as first:
            try:
                with self._locked(self._locks / "_store.lock", "the store", timeout=min(self.lock_timeout, 10.0)):
                    return self._read_record(folder, name, load_tensors)
            except SchemaVersionError:
                raise
            except StoreError:
                raise first from None

    def load_cache(self, run_name: str) -> dict[str, Tensor] | None:
        """The cached tensors of a run's current record (see :meth:`write_record`), or ``None``.

        ``None`` when the record has no cache, or its ``cache.safetensors`` is missing,
        truncated or from another write: a cache is only ever a shortcut, so its absence
        is never an error (an undecodable one is warned about).

        Example
        -------
        >>> cache = store.load_cache("math")  # doctest: +SKIP
        >>> cache is None or all(t.ndim == 2 for t in cache.values())  # doctest: +SKIP
        True
        """
        name = check_name(run_name)
        try:
            meta, _ = self._read_settled(self._runs / name, name, load_tensors=False)
        except (_Unreadable, SchemaVersionError):
            return None
        return self._cache_of(name, meta)

    def _cache_of(self, name: str, meta: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """:meth:`load_cache` for a record whose ``meta`` the caller has read."""
        cache_id = meta.get("cache_id")
        if not isinstance(cache_id, str):
            return None
        try:
            data = (self._runs / name / CACHE_FILE).read_bytes()
            if _safetensors_metadata(data, len(data)).get("write_id") != cache_id:
                return None  # the record was rewritten between the two reads; the caller recomputes
        except (_Unreadable, OSError):
            return None
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as err:  # safetensors raises SafetensorError, and torch errors for bad dtypes
            self._warn(f"record {name!r}: {CACHE_FILE} cannot be decoded ({err}); recomputing what it holds")
            return None

    def load_signals(self, run_name: str) -> RunSignals:
        """Load a record written by :meth:`write_signals` as ``RunSignals``."""
        from mergeprobe.signals import RunSignals

        record = self.load(run_name)
        if not isinstance(record.meta.get("signals"), dict):
            raise StoreError(
                f"probe store {str(self.path)!r}: record {record.run_name!r} has no RunSignals metadata (meta['signals']); "
                "was it written with ProbeStore.write_signals?"
            )
        return RunSignals.from_tensors(record.tensors, record.meta["signals"])

    def _scan(self) -> list[tuple[str, dict[str, Any]]]:
        """Names and metadata of every complete record, warning about the others.

        A record being overwritten is listed too: if the listing falls between the two
        renames of an overwrite (only the writer's ``.<name>.old-…`` is there), the
        record is read again once the writer releases the store lock.
        """
        with self._os_errors("list the runs in", self._runs):
            entries = sorted(_entries(self._runs), key=lambda p: p.name)
        listed = {entry.name for entry in entries}
        found: list[tuple[str, dict[str, Any]]] = []
        swapping: set[str] = set()
        for entry in entries:
            temp = _TEMP.fullmatch(entry.name)
            if temp is not None:
                if entry.is_dir() and self._is_stale(entry, temp["name"]):
                    what = "a killed write" if temp["kind"] == "tmp" else "an interrupted overwrite"
                    self._warn(f"record {temp['name']!r}: {entry.name} was left by {what}; skipped (the next write of that run cleans it up)")
                elif temp["kind"] == "old" and temp["name"] not in listed and _is_safe_name(temp["name"]):
                    swapping.add(temp["name"])
                continue
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                meta, _ = self._read_settled(entry, entry.name, load_tensors=False)
            except (_Unreadable, SchemaVersionError) as reason:
                self._warn(f"record {entry.name!r} skipped: {reason}")
                continue
            found.append((entry.name, meta))
        for name in sorted(swapping):
            try:
                meta, _ = self._read_settled(self._runs / name, name, load_tensors=False)
            except (_Unreadable, SchemaVersionError):
                continue  # the overwrite did not finish; its .old directory is reported once it is stale
            found.append((name, meta))
        return sorted(found, key=lambda item: item[0])

    def _is_stale(self, entry: Path, name: str) -> bool:
        """A temp dir is stale when no writer holds its run's lock (writers rename before releasing)."""
        try:
            check_name(name)
        except StoreError:
            return False
        lock = filelock.FileLock(str(self._run_lock(name)), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            return False
        except OSError:
            return True  # a read-only view of the store: no writer of ours can be active
        try:
            return entry.exists()
        finally:
            lock.release()

    def _warn(self, message: str) -> None:
        warnings.warn(f"probe store {str(self.path)!r}: {message}.", IncompleteRecordWarning, stacklevel=4)

    def runs(self, status: str | None = None, base_model: Any = None) -> list[str]:
        """Names of the complete records, sorted, optionally filtered.

        Incomplete or unreadable records are skipped with an
        :class:`IncompleteRecordWarning` naming the record and the reason.

        Parameters
        ----------
        status:
            Keep records with this status.
        base_model:
            Keep records of this base model: equal to ``meta["base_model"]``, or, when
            that is a dict, equal to one of its values (e.g. its ``name_or_path``).

        Example
        -------
        >>> store.runs(status="complete", base_model="Qwen/Qwen2.5-0.5B")  # doctest: +SKIP
        ['code', 'math']
        """
        return [name for name, meta in self._scan() if _matches(meta, status, base_model)]

    def records(self, status: str | None = None, base_model: Any = None) -> list[RunRecord]:
        """The complete records (with tensors), filtered as :meth:`runs`; unreadable ones are skipped with a warning."""
        found: list[RunRecord] = []
        for name in self.runs(status, base_model):
            try:
                found.append(self.load(name))
            except StoreError as err:
                self._warn(f"record {name!r} skipped: {err}")
        return found

    # ----------------------------------------------------------------- features

    def pairwise_features(self, run_a: str, run_b: str, model: Any = None) -> dict[str, float]:
        """Pairwise mergeability features of two stored runs, oriented towards ``a``.

        The symmetric features of :func:`~mergeprobe.features.pairwise_features` plus the
        ``member.`` / ``partner.`` ones of :func:`~mergeprobe.features.member_features`:
        what the predictor reads for ``a``'s retention in a merge with ``b``.

        Without ``model``, the features a run's probe stored for this pair (with the
        cross-disturbance it computed on the model it had in memory) are returned; when
        only the reverse orientation was stored, its symmetric part stands in and the
        oriented forward-pass features are missing (the predictor treats them as unknown). Otherwise they
        are computed from the two records; with ``model`` (the base model with its
        PEFT wrapper) the cross-disturbance features are computed too.

        Example
        -------
        >>> store.pairwise_features("math", "code")["update_alignment.mean"]  # doctest: +SKIP
        0.03
        """
        from mergeprobe import features

        if model is None:
            return self._stored_pair_features(run_a, run_b, self.pair_features, {})
        a = self.load_signals(run_a)
        b = self.load_signals(run_b)
        return features.oriented_pairwise_features(a, b, self._cross_disturbance(model, {run_a: a, run_b: b}))

    def pairwise_features_among(self, runs: Sequence[str]) -> dict[tuple[str, str], dict[str, float]]:
        """:meth:`pairwise_features` (without a model) of every ordered pair of distinct ``runs``.

        The same values as one call per pair, but every pair file is read at most once
        and every record loaded at most once, however many pairs fall back to it.

        Example
        -------
        >>> features = store.pairwise_features_among(["math", "code", "chat"])  # doctest: +SKIP
        >>> features["math", "code"] == store.pairwise_features("math", "code")  # doctest: +SKIP
        True
        """
        stored: dict[tuple[str, str], dict[str, float] | None] = {}

        def read_once(run_a: str, run_b: str) -> dict[str, float] | None:
            if (run_a, run_b) not in stored:
                stored[run_a, run_b] = self.pair_features(run_a, run_b)
            return stored[run_a, run_b]

        names = list(dict.fromkeys(runs))
        signals: dict[str, RunSignals] = {}
        return {(a, b): self._stored_pair_features(a, b, read_once, signals) for a in names for b in names if a != b}

    def _stored_pair_features(
        self,
        run_a: str,
        run_b: str,
        read: Callable[[str, str], dict[str, float] | None],
        signals: dict[str, RunSignals],
    ) -> dict[str, float]:
        """:meth:`pairwise_features` without a model, reading pair files with ``read`` and records once into ``signals``."""
        from mergeprobe import features

        stored = read(run_a, run_b)
        if stored is not None:
            return stored
        reverse = read(run_b, run_a)
        for name in (run_a, run_b):
            if name not in signals:
                signals[name] = self.load_signals(name)
        a, b = signals[run_a], signals[run_b]
        if reverse is not None:
            # The oriented member features of (b, a) are b's; keep the symmetric ones, add a's own.
            return {**features.symmetric_part(reverse), **features.member_features(a, [b], None)}
        return features.oriented_pairwise_features(a, b, None)

    def _cross_disturbance(self, model: Any, runs: Mapping[str, RunSignals]) -> dict[str, Any]:
        """Cross-disturbance of two stored runs on ``model``, with the own states their records cache.

        A run's cached states are used only if its record names ``model``'s base weights
        (the fingerprint the probe stores); otherwise they are recomputed on ``model``.
        """
        from mergeprobe import features
        from mergeprobe.probe import base_model_identity
        from mergeprobe.signals import own_states_from_cache

        fingerprint = base_model_identity(model)["fingerprint"]
        own: dict[int, Any] = {}
        for name, signals in runs.items():
            try:
                meta, _ = self._read_settled(self._runs / name, name, load_tensors=False)
            except (_Unreadable, SchemaVersionError):
                continue  # rewritten or removed since its signals were loaded: recompute its states
            if meta.get("base_fingerprint") == fingerprint:
                states = own_states_from_cache(self._cache_of(name, meta), signals)
                if states is not None:
                    own[id(signals)] = states
        a, b = runs.values()
        return features.cross_disturbance(model, a, b, own_states=own)

    # ----------------------------------------------------------------- outcomes

    def record_outcome(
        self,
        runs: list[str],
        method: str,
        retention: Mapping[str, float],
        scores: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """Store the measured retention of a real merge; returns the outcome id.

        Example
        -------
        >>> store.record_outcome(["math", "code"], "pico", {"math": 0.97, "code": 0.91})  # doctest: +SKIP
        '3f2c…'
        """
        names = [check_name(name) for name in runs]
        if not names:
            raise StoreError("record_outcome needs the names of the merged runs.")
        if not isinstance(method, str) or not method:
            raise StoreError(f"merge method {method!r} must be a non-empty string.")
        values: dict[str, float] = {}
        for key, value in dict(retention).items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise StoreError(f"retention[{key!r}] = {value!r}: retention must map names to finite numbers.")
            values[key] = float(value)
        outcome_id = uuid.uuid4().hex
        outcome = {
            "id": outcome_id,
            "runs": names,
            "method": method,
            "retention": values,
            "scores": dict(scores) if scores is not None else None,
            "extra": extra,
            "schema_version": SCHEMA_VERSION,
            "created": _now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        target = self._outcomes / f"{outcome_id}.json"
        text = _json_text(outcome, "outcome")
        with self._os_errors("write outcome", target):
            atomic_write_text(target, text)
        return outcome_id

    def outcomes(self) -> list[dict[str, Any]]:
        """All recorded outcomes, oldest first; unreadable files are skipped with a warning."""
        with self._os_errors("list the outcomes in", self._outcomes):
            files = sorted(p for p in _entries(self._outcomes) if p.suffix == ".json" and not p.name.startswith("."))
        found: list[dict[str, Any]] = []
        for path in files:
            try:
                outcome = _read_json(path)
                if outcome.get("schema_version") != SCHEMA_VERSION or not isinstance(outcome.get("retention"), dict):
                    raise _Unreadable(f"not an outcome of schema version {SCHEMA_VERSION}")
            except _Unreadable as reason:
                self._warn(f"outcome {path.name} skipped: {reason}")
                continue
            found.append(outcome)
        return sorted(found, key=lambda o: (str(o.get("created")), str(o.get("id"))))

    # ----------------------------------------------------------------- merge on end

    def merge_dir(self, set_id: str) -> Path:
        """The directory of a merge set (``merges/<set_id>/``), created if needed."""
        folder = self._merges / check_name(set_id, "merge set id")
        with self._os_errors("create", folder):
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    def claim_merge(self, set_id: str) -> bool:
        """Claim the merge of a set; exactly one of many concurrent callers gets ``True``.

        The claim is ``merges/<set_id>/CLAIM``, created with ``O_CREAT | O_EXCL``. A
        claim is never released: delete the file to let the set be merged again.

        Example
        -------
        >>> set_id = merge_set_id(["math", "code"])
        >>> if store.claim_merge(set_id):  # doctest: +SKIP
        ...     merge_and_save(store.merge_dir(set_id)); store.mark_merged(set_id, {"method": "pico"})
        """
        claim = self.merge_dir(set_id) / CLAIM_FILE
        info = {"set_id": set_id, "claimed": _now(), "host": socket.gethostname(), "pid": os.getpid()}
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        except OSError as err:
            raise self._store_error("claim the merge of", claim, err) from err
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(_json_text(info, "claim").encode())
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            with suppress(OSError):
                os.unlink(claim)  # give the claim back: this process cannot merge either
            raise self._store_error("write", claim, err) from err
        return True

    def mark_merged(self, set_id: str, info: Mapping[str, Any]) -> Path:
        """Record that a set was merged (``merges/<set_id>/result.json``, atomically); returns its path."""
        target = self.merge_dir(set_id) / RESULT_FILE
        result = {"set_id": set_id, "merged": _now(), "host": socket.gethostname(), "pid": os.getpid(), "info": dict(info)}
        text = _json_text(result, f"merge info for {set_id!r}")
        with self._os_errors("write", target):
            atomic_write_text(target, text)
        return target

    def merges(self) -> list[dict[str, Any]]:
        """Every merge set: ``{"set_id", "claimed", "claim", "merged", "info", "path"}``, sorted by set id.

        ``claim`` is the claim file's content (``{}`` while it is being written);
        ``info`` is what :meth:`mark_merged` recorded, or ``None``. An unreadable
        result is reported as not merged, with a warning.
        """
        with self._os_errors("list the merges in", self._merges):
            folders = sorted(p for p in _entries(self._merges) if p.is_dir() and not p.name.startswith("."))
        found: list[dict[str, Any]] = []
        for folder in folders:
            claim_file, result_file = folder / CLAIM_FILE, folder / RESULT_FILE
            claim: dict[str, Any] | None = None
            if claim_file.exists():
                try:
                    claim = _read_json(claim_file)
                except _Unreadable:
                    claim = {}
            result: dict[str, Any] | None = None
            if result_file.exists():
                try:
                    result = _read_json(result_file)
                except _Unreadable as reason:
                    self._warn(f"merge {folder.name!r}: {RESULT_FILE} skipped: {reason}")
            found.append(
                {
                    "set_id": folder.name,
                    "claimed": claim is not None,
                    "claim": claim,
                    "merged": result is not None,
                    "info": result.get("info") if result is not None else None,
                    "path": folder,
                }
            )
        return found

    # ------------------------------------------------------------ pair features

    def _pair_file(self, run_a: str, run_b: str) -> Path:
        return self.path / PAIRS_DIR / f"{check_name(run_a)}{PAIR_SEPARATOR}{check_name(run_b)}.json"

    def write_pair_features(self, run_a: str, run_b: str, features: Mapping[str, float]) -> Path:
        """Store the features of the ordered pair (a, b), as computed by run a's probe (atomically).

        Cross-disturbance needs the base model in memory, so the run that computes a
        pair's features stores them for every other reader (CLI, decision, refit).
        """
        target = self._pair_file(run_a, run_b)
        text = _json_text({"run_a": run_a, "run_b": run_b, "written": _now(), "features": dict(features)}, "pair features")
        with self._os_errors("write", target):
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, text)
        return target

    def pair_features(self, run_a: str, run_b: str) -> dict[str, float] | None:
        """The stored features of the ordered pair (a, b), or ``None`` (unreadable: warned)."""
        path = self._pair_file(run_a, run_b)
        if not path.exists():
            return None
        try:
            features = _read_json(path)["features"]
            if not isinstance(features, dict):
                raise _Unreadable(f"'features' is a {type(features).__name__}, not an object")
            return dict(features)
        except (_Unreadable, KeyError) as reason:
            self._warn(f"pair features {path.name!r} skipped: {reason}")
            return None

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair with readable stored features."""
        found = []
        for path in _entries(self.path / PAIRS_DIR):
            if path.suffix != ".json" or path.name.startswith("."):
                continue
            try:
                data = _read_json(path)
                found.append((str(data["run_a"]), str(data["run_b"])))
            except (_Unreadable, KeyError, TypeError) as reason:
                self._warn(f"pair features {path.name!r} skipped: {reason}")
        return sorted(found)


PAIRS_DIR = "pairs"
PAIR_SEPARATOR = "+"  # run names cannot contain "+", so a pair file name is unambiguous


def _entries(folder: Path) -> list[Path]:
    """A folder's entries; none if it does not exist (a store opened with create=False)."""
    return list(folder.iterdir()) if folder.is_dir() else []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except OSError as err:
        raise _Unreadable(f"cannot read it ({err})") from err
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise _Unreadable(f"not valid JSON, probably truncated ({err})") from err
    if not isinstance(value, dict):
        raise _Unreadable("not a JSON object")
    return value


def _matches(meta: Mapping[str, Any], status: str | None, base_model: Any) -> bool:
    if status is not None and meta.get("status") != status:
        return False
    if base_model is None:
        return True
    stored = meta.get("base_model")
    if stored == base_model:
        return True
    return isinstance(stored, dict) and not isinstance(base_model, dict) and base_model in stored.values()
