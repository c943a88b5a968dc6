"""Run folders: is this a run, who is using it, what was left half-written, and where a result came from.

A training writes into one folder (``--out``).  This module keeps that folder safe:

* :func:`inspect_folder` / :func:`check_folder` — a folder is *a run of this toolkit* when it holds
  ``provenance.json`` (written first by every run) or a valid ``checkpoint.pt``.  A new run needs a
  new or empty folder; a run is continued with ``resume`` or started over with ``overwrite``, which
  removes only the files a run writes; a non-empty folder that is not a run is never written to.
* :class:`RunLock` — ``.lock``, held for the run's lifetime: an exclusive ``flock`` on the file
  (released by the kernel when the process dies, so a stale lock of a dead process is recognised
  as such) holding the owner's PID, host and command for the message a second training gets.
  Where ``flock`` is unavailable, a lock whose PID no longer runs on this host is stale.
* :func:`remove_orphans` — temporary files of atomic writes (:mod:`theory.atomic`) that a kill left
  behind, removed on the next start or resume (under the lock, so no writer is active).
* :func:`provenance` and :class:`TeeLog` — ``provenance.json`` (one record per start or resume: the
  exact command line, git commit when the toolkit runs from a checkout, package versions, device,
  host, outcome) and ``train.log`` (everything the run prints, progress bars excepted).

:class:`RunSession` puts these together in the order that keeps every promise: check (read only),
lock, check again under the lock, build the trainer (a bad configuration still writes nothing: a
folder the session created is removed again), then :meth:`RunSession.start` clears an overwritten
run, removes orphans, writes provenance and starts ``train.log``.  Under data parallelism only one
process (rank 0) opens a session.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from theory.atomic import atomic_write_text

from .audit import AUDIT_CSV, AUDIT_JSON
from .checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from .report import REPORT_JSON, REPORT_MD
from .runlog import LOG_CSV

PROVENANCE = "provenance.json"
TRAIN_LOG = "train.log"
LOCK = ".lock"
CONFIG_ECHO = "config.toml"
TENSORBOARD = "tensorboard"
TOOLKIT = "structure-discovery"
#: Files and folders a run writes (plus its export folder, ``export.dir``); ``overwrite`` removes only these.
RUN_FILES = (CHECKPOINT, CONFIG_ECHO, LOG_CSV, REPORT_JSON, REPORT_MD, AUDIT_JSON, AUDIT_CSV, TRAIN_LOG, PROVENANCE,
             TENSORBOARD)
#: Temporary files of :func:`theory.atomic.atomic_path`: ``.<stem>.<8 random chars>.tmp<suffix>``.
ORPHAN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
#: Distributions whose versions every provenance record lists (those installed).
PACKAGES = ("torch", "numpy", "scipy", "sympy", "mnist1d", "scikit-learn", "tqdm", "tensorboard", "hypothesis")


class RunDirError(ValueError):
    """The run folder cannot be used as asked (the message says why and what to do); nothing was written."""


# --------------------------------------------------------------------------------------------------
# What a folder holds
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderState:
    """What :func:`inspect_folder` found in ``path``.

    ``kind``: ``"absent"``, ``"empty"`` (nothing, or only a lock and orphaned temporary files),
    ``"run"`` (a run of this toolkit), ``"foreign"`` (anything else non-empty) or ``"file"``.
    """

    path: Path
    kind: str
    entries: tuple[str, ...] = ()
    checkpoint: dict[str, Any] | None = field(default=None, repr=False)
    why: str = ""

    @property
    def finished(self) -> bool:
        if self.checkpoint is None:
            return False
        p, cfg = self.checkpoint.get("progress", {}), self.checkpoint.get("config", {})
        return int(p.get("epoch", 0)) >= int(cfg.get("train", {}).get("epochs", 0) or 0)

    def describe(self) -> str:
        """``"finished: checkpoint after 30 of 30 epochs"`` and the like."""
        if self.kind != "run":
            return self.kind
        if self.why:
            return f"its checkpoint is unusable: {self.why}"
        if self.checkpoint is None:
            return "unfinished: no checkpoint, its first epoch did not finish"
        done = int(self.checkpoint["progress"].get("epoch", 0))
        total = int(self.checkpoint["config"].get("train", {}).get("epochs", 0) or 0)
        return f"{'finished' if self.finished else 'unfinished'}: checkpoint after {done} of {total} epochs"


def _listing(entries: Sequence[str], limit: int = 8) -> str:
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def _is_ignorable(name: str) -> bool:
    return name == LOCK or bool(ORPHAN.match(name))


def _read_provenance(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("toolkit") == TOOLKIT else None


_LAST_LOADED: list[tuple[tuple[str, int, int, int], dict[str, Any]]] = []


def _load_once(path: Path) -> dict[str, Any]:
    """:func:`load_checkpoint`, reusing the last result while the file is unchanged (same inode, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if _LAST_LOADED and _LAST_LOADED[0][0] == key:
        return _LAST_LOADED[0][1]
    ckpt = load_checkpoint(path)
    _LAST_LOADED[:] = [(key, ckpt)]
    return ckpt


def inspect_folder(path: str | Path) -> FolderState:
    """Classify ``path`` (read only; a checkpoint found is loaded and validated)."""
    path = Path(path)
    if not path.exists():
        return FolderState(path, "absent")
    if not path.is_dir():
        return FolderState(path, "file")
    entries = tuple(sorted(e.name for e in path.iterdir()))
    visible = tuple(e for e in entries if not _is_ignorable(e))
    if not visible:
        return FolderState(path, "empty", entries)
    ckpt: dict[str, Any] | None = None
    why = ""
    if (path / CHECKPOINT).exists():
        try:
            ckpt = _load_once(path / CHECKPOINT)
        except CheckpointError as exc:
            why = str(exc)
    if _read_provenance(path) is not None or ckpt is not None:
        if why:  # a run whose checkpoint is damaged
            return FolderState(path, "run", visible, None, why)
        return FolderState(path, "run", visible, ckpt)
    return FolderState(path, "foreign", visible, None, why)


def check_folder(path: str | Path, *, resume: bool, overwrite: bool) -> FolderState:
    """The folder's state if a run may start (new or ``overwrite``) or continue (``resume``) in it; else
    :class:`RunDirError` saying why, naming what is there."""
    state = inspect_folder(path)
    path = state.path
    if resume and overwrite:
        raise RunDirError("--resume continues a run and --overwrite starts it over: give one of them")
    if state.kind == "file":
        raise RunDirError(f"--out {path} is a file, not a folder")
    if state.kind == "foreign":
        why = f"; {state.why}" if state.why else ""
        raise RunDirError(
            f"--out {path} is not empty and is not a run of this toolkit (it holds: {_listing(state.entries)}{why}); "
            "choose a new or empty folder" + (" (--overwrite only starts over a run of this toolkit)" if overwrite
                                               else "")
        )
    if resume:
        if state.kind != "run":
            raise RunDirError(f"--resume: no checkpoint {path / CHECKPOINT} ({path} holds no run)")
        if state.why:
            raise RunDirError(f"--resume: {state.why}")
        if state.checkpoint is None:
            raise RunDirError(f"--resume: no checkpoint {path / CHECKPOINT} (the run is {state.describe()}); "
                              "use --overwrite to start it over")
        return state
    if state.kind == "run" and not overwrite:
        hint = "--resume to continue it, " if state.checkpoint is not None and not state.finished else ""
        raise RunDirError(f"{path} already holds a run ({state.describe()}); use {hint}--overwrite to start it "
                          "over, or another --out")
    return state


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_text(info: dict[str, Any]) -> str:
    cmd = " ".join(str(a) for a in info.get("command", []))
    since = f", since {info['started']}" if info.get("started") else ""
    return f"process {info.get('pid', '?')} on {info.get('host', '?')}{since}" + (f" ({cmd})" if cmd else "")


class RunLock:
    """An exclusive lock on a run folder, held from :meth:`acquire` to :meth:`release` (or the context's end).

    The lock is ``flock`` on ``<folder>/.lock`` (a process that dies releases it), re-checked against
    the path after locking so that a lock file removed and re-created in between is never shared.
    The file holds the owner's PID, host, start time and command; on file systems without
    ``flock`` a lock file whose PID does not run on this host is stale and taken over.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": list(sys.argv)}

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _in_use(self) -> RunDirError:
        return RunDirError(f"{self.folder} is in use by {_owner_text(self._read())}: a second training or resume "
                           f"cannot share it; wait for that run to end or stop it (its lock: {self.path})")

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self._acquire_by_pid()
        for _ in range(10):
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise self._in_use() from None
            except OSError as exc:
                fh.close()
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return self._acquire_by_pid()
                raise
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was removed (its owner ended) between open and flock: lock the new one
                fh.close()
                continue
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(self._info()))
            fh.flush()
            self._fh = fh
            return self
        raise RunDirError(f"{self.folder}: could not lock {self.path} (it keeps being replaced)")

    def _acquire_by_pid(self) -> RunLock:
        """Fallback without ``flock``: ``O_EXCL`` creation; a lock of a PID not running on this host is stale."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._read()
                stale = info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
                    and not _pid_alive(info["pid"])
                if not stale:
                    raise self._in_use() from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            fh = os.fdopen(fd, "w", encoding="utf-8")
            fh.write(json.dumps(self._info()))
            fh.flush()
            self._fh = fh
            return self
        raise self._in_use()

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: a waiting process then sees a new file (inode check)
        fh.close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# Cleaning up
# --------------------------------------------------------------------------------------------------


def remove_orphans(folder: str | Path) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes below ``folder``; returns what was removed.

    Call only while holding the folder's :class:`RunLock` (no atomic write of this run is in progress).
    """
    removed: list[Path] = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if ORPHAN.match(name):
                p = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def _export_dirs(folder: Path, extra: Sequence[str]) -> list[Path]:
    """Export folders of the old run (its ``config.toml``) and of the new configuration, inside ``folder`` only."""
    names = ["export", *extra]
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with contextlib.suppress(OSError, ValueError):
        old = tomllib.loads((folder / CONFIG_ECHO).read_text(encoding="utf-8")).get("export", {}).get("dir")
        if isinstance(old, str):
            names.append(old)
    root = folder.resolve()
    out = []
    for name in dict.fromkeys(names):
        p = (folder / name).resolve()
        if p != root and root in p.parents and p.is_dir():
            out.append(p)
    return out


def clear_run(folder: str | Path, export_dirs: Sequence[str] = ()) -> list[Path]:
    """Remove the files of the run in ``folder`` (:data:`RUN_FILES` and its export folders); other files stay."""
    folder = Path(folder)
    removed: list[Path] = []
    for p in [*(folder / n for n in RUN_FILES), *_export_dirs(folder, export_dirs)]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            removed.append(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------------
# Provenance and train.log
# --------------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def git_commit(source: str | Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout the toolkit runs from (``None`` when it is not one)."""
    root = Path(source) if source is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != root.resolve():  # installed inside some other repository
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` and of this toolkit (absent ones are left out)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for name in (TOOLKIT, *names):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def device_record(device: Any = None) -> dict[str, Any]:
    """The device a run uses: torch device, CUDA name, CPU model, threads, platform."""
    import torch

    rec: dict[str, Any] = {"device": str(device) if device is not None else "cpu",
                           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "platform": platform.platform(), "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                rec["cpu"] = line.split(":", 1)[1].strip()
                break
    if device is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name(device)
        rec["cuda"] = torch.version.cuda
    return rec


def provenance(argv: Sequence[str], *, device: Any = None, resume: bool = False,
               overwrite: bool = False) -> dict[str, Any]:
    """One record: command line, working folder, git commit, packages, device, host, start time."""
    return {
        "started": _now(),
        "command": [str(a) for a in argv],
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "resume": resume,
        "overwrite": overwrite,
        "git": git_commit(),
        "packages": package_versions(),
        "device": device_record(device),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def append_provenance(folder: str | Path, record: dict[str, Any]) -> Path:
    """Add ``record`` to ``provenance.json`` (one record per start or resume), atomically."""
    path = Path(folder) / PROVENANCE
    data = _read_provenance(Path(folder)) or {"toolkit": TOOLKIT, "runs": []}
    data.setdefault("runs", []).append(record)
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")
    return path


def close_provenance(folder: str | Path, status: str) -> None:
    """Mark the last record of ``provenance.json`` with its end time and ``status``."""
    data = _read_provenance(Path(folder))
    if not data or not data.get("runs"):
        return
    data["runs"][-1].update({"ended": _now(), "status": status})
    atomic_write_text(Path(folder) / PROVENANCE, json.dumps(data, indent=1, default=str) + "\n")


class _Tee:
    """A text stream that writes to ``stream`` and to ``log`` (lines with ``\\r``, progress bars, skipped)."""

    def __init__(self, stream: Any, log: IO[str]) -> None:
        self._stream, self._log = stream, log

    def write(self, s: str) -> int:
        n = self._stream.write(s)
        if "\r" not in s and not self._log.closed:
            self._log.write(s)
        return len(s) if n is None else n

    def flush(self) -> None:
        self._stream.flush()
        if not self._log.closed:
            self._log.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class TeeLog:
    """``sys.stdout`` and ``sys.stderr`` also written to ``path`` (appended) while the context is open."""

    def __init__(self, path: str | Path, header: str = "") -> None:
        self.path = Path(path)
        self.header = header
        self._log: IO[str] | None = None
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> TeeLog:
        self._log = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in __exit__
        if self.header:
            self._log.write(self.header.rstrip("\n") + "\n")
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self._log)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self._log)  # type: ignore[assignment]
        return self

    def record(self, text: str) -> None:
        """Write ``text`` to the log file only (e.g. a traceback the interpreter prints after the context)."""
        if self._log is not None and not self._log.closed:
            self._log.write(text if text.endswith("\n") else text + "\n")

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        if self._log is not None:
            self._log.close()
            self._log = None


# --------------------------------------------------------------------------------------------------
# One session
# --------------------------------------------------------------------------------------------------


class RunSession:
    """The life of one training in its folder (see the module doc); a context manager.

    ``with RunSession(out, resume=..., overwrite=..., argv=...) as session:`` checks the folder and
    takes the lock (:class:`RunDirError` otherwise); build the trainer inside, then call
    :meth:`start` before training.  On leaving, the provenance record gets its outcome, ``train.log``
    is closed and the lock released; if the session created the folder and :meth:`start` was never
    reached, the folder is removed again (a refused configuration writes nothing).
    """

    def __init__(self, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 argv: Sequence[str] | None = None) -> None:
        self.out = Path(out)
        self.resume, self.overwrite = resume, overwrite
        self.argv = list(sys.argv if argv is None else argv)
        self.lock = RunLock(self.out)
        self.state: FolderState | None = None
        self.started = False
        self.removed: list[Path] = []
        self._created: list[Path] = []  # folders this session created (leaf first)
        self._tee: TeeLog | None = None
        self.status = ""

    def __enter__(self) -> RunSession:
        check_folder(self.out, resume=self.resume, overwrite=self.overwrite)  # read only
        self._created = [p for p in [self.out, *self.out.parents] if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
            self.state = check_folder(self.out, resume=self.resume, overwrite=self.overwrite)  # again, locked
        except BaseException:
            self.lock.release()
            self._remove_if_created()
            raise
        return self

    def start(self, *, device: Any = None, export_dirs: Sequence[str] = ()) -> None:
        """The run begins: clear an overwritten run, remove orphans, append provenance, start ``train.log``."""
        if self.overwrite and self.state is not None and self.state.kind == "run":
            self.removed += clear_run(self.out, export_dirs)
        self.removed += remove_orphans(self.out)
        record = provenance(self.argv, device=device, resume=self.resume, overwrite=self.overwrite)
        append_provenance(self.out, record)
        command = " ".join(self.argv)
        self._tee = TeeLog(self.out / TRAIN_LOG, f"=== {record['started']} {'resume' if self.resume else 'start'}: "
                                                 f"{command}")
        self._tee.__enter__()
        self.started = True

    def _remove_if_created(self) -> None:
        """Before :meth:`start`: remove the folders this session created (they hold at most a released lock)."""
        if not self._created or self.started:
            return
        with contextlib.suppress(OSError):
            for p in self.out.iterdir():
                if _is_ignorable(p.name):
                    p.unlink()
            for folder in self._created:
                folder.rmdir()

    def finish(self, status: str) -> None:
        """The outcome recorded in ``provenance.json`` (default: ``completed``, or from the exception leaving)."""
        self.status = status

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self.started:
                status = self.status or ("completed" if exc_type is None else _status(exc_type))
                if exc_type is not None and self._tee is not None:
                    self._tee.record("".join(traceback.format_exception(exc_type, exc, tb)))
                with contextlib.suppress(OSError):
                    close_provenance(self.out, status)
        finally:
            if self._tee is not None:
                self._tee.__exit__(None, None, None)
                self._tee = None
            self.lock.release()
            self._remove_if_created()


def _status(exc_type: type[BaseException]) -> str:
    if issubclass(exc_type, KeyboardInterrupt) or exc_type.__name__ == "RunInterrupted":
        return "interrupted"
    name = exc_type.__name__
    return "diverged" if name == "TrainingDiverged" else f"failed ({name})"


__all__ = [
    "LOCK",
    "PROVENANCE",
    "RUN_FILES",
    "TRAIN_LOG",
    "FolderState",
    "RunDirError",
    "RunLock",
    "RunSession",
    "TeeLog",
    "append_provenance",
    "check_folder",
    "clear_run",
    "close_provenance",
    "git_commit",
    "inspect_folder",
    "package_versions",
    "provenance",
    "remove_orphans",
]
