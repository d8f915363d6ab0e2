"""One writer per output folder: :class:`RunLock` guards ``<out>/.masqclip/lock`` for the length of a run.

Two ``masqclip`` processes writing into one ``--out`` compute items twice and, worse, the start-up clean-up of one
(:func:`~masqclip_cli.io.files.remove_stale_temp_files`) deletes the other's in-flight temporary files. The lock makes
the second process stop before it touches anything, with :class:`RunLockedError` naming the holder::

    <out>: another masqclip run (pid 1234 on host, started 12:03:04) is writing here; wait for it or use another --out

Protocol for a writer (the engine): acquire the lock first, then clean up stale temporary files, then write; release
at the end (or leave it to the ``with`` block)::

    with RunLock(out_dir) as lock:
        if not lock.read_only:
            remove_stale_temp_files(out_dir)   # safe: no other run can be writing here now
        ...

How it works:

- POSIX (``fcntl`` available): ``fcntl.flock(LOCK_EX | LOCK_NB)`` on an open descriptor of ``<out>/.masqclip/lock``,
  kept open for the run. The kernel drops the lock when the process ends, however it ends (``SIGKILL``, a crash, a
  lost machine for a local disk), so a lock left by a dead process is taken over with no pid guessing. The file holds
  one JSON line with the holder's ``pid``, ``host`` and ``started`` (ISO 8601, local time with offset), read only to
  word the message; it is emptied on release and never deleted or replaced (a replaced file would be a different
  inode, hence a different lock). Child processes made with ``fork`` share the descriptor and so keep the lock while
  they live. This file is the one file under ``--out`` not written through :mod:`masqclip_cli.io.files`: an atomic
  replace would break the lock, and its content is advisory.
- Without ``fcntl`` (Windows), or on a filesystem that refuses ``flock``: the lock file is created with
  ``O_CREAT | O_EXCL`` and holds the same JSON line; it is deleted on release. A lock file whose holder is on this
  host and no longer alive (Windows: ``OpenProcess``/``GetExitCodeProcess``; POSIX: ``os.kill(pid, 0)``) is stale and
  taken over, as is an empty or unreadable one older than 5 s (its creator died before writing it). Limits of this
  fallback: a holder on another host cannot be checked (the message says which file to delete once that run is known
  dead), a recycled pid reads as alive, and two processes taking over the same stale lock within the same few
  milliseconds may both succeed.
- Read-only folders: when the lock file cannot be created or opened for writing because the folder (or the file) is
  read-only to us (``EROFS``, ``EACCES``, ``EPERM``), the lock is in the *read-only* state (:attr:`RunLock.read_only`):
  this process cannot write there, so it cannot harm another run, and the caller must write nothing (a re-run over a
  complete read-only ``--out`` then succeeds). A lock file that exists is still checked (a shared ``flock`` probe on
  POSIX): a run writing into the same folder through another path (a read-only bind mount of a writable folder,
  another user with write permission) still gets :class:`RunLockedError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from masqclip_cli.io.files import STATE_DIR

try:  # POSIX
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "LockHolder", "RunLock", "RunLockedError", "read_lock_holder"]

#: The lock file, relative to the output folder.
LOCK_FILE = Path(STATE_DIR, "lock")

#: errno values of "this folder cannot be written by us" (the same set as :mod:`masqclip_cli.io.files` uses).
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
#: errno values of "this filesystem does not do flock": use the exclusive-create fallback there.
_NO_FLOCK_ERRNOS = frozenset(
    e for e in (getattr(errno, "ENOLCK", None), getattr(errno, "EOPNOTSUPP", None), getattr(errno, "ENOTSUP", None),
                getattr(errno, "ENOSYS", None)) if e is not None
)
#: How long a refused process waits for the holder to write its details (it has the lock but has not written them
#: yet) before reporting what it has.
_SETTLE_S = 1.0
#: How old an empty or unreadable fallback lock file must be to count as abandoned (its creator died between the
#: create and the write); younger, its creator is taken to be writing it now.
_ABANDONED_S = 5.0
_POLL_S = 0.01
_MAX_LOCK_BYTES = 4096


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a run lock: what the lock file says."""

    pid: int
    host: str
    #: ISO 8601 local time with offset, e.g. ``2024-05-01T12:03:04+02:00``.
    started: str

    def to_json(self) -> str:
        """The lock file's one line (no newline)."""
        return json.dumps({"pid": self.pid, "host": self.host, "started": self.started}, ensure_ascii=False,
                          separators=(",", ":"))

    @classmethod
    def from_bytes(cls, data: bytes) -> LockHolder | None:
        """Parse a lock file's content; None for anything that is not a complete holder record (empty, partly
        written, foreign)."""
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        pid, host, started = obj.get("pid"), obj.get("host"), obj.get("started")
        if type(pid) is not int or pid <= 0 or not isinstance(host, str) or not isinstance(started, str):
            return None
        return cls(pid, host, started)

    def started_text(self, now: datetime | None = None) -> str:
        """The start time for a message: ``12:03:04`` on the day of ``now`` (default: now, local time), else
        ``2024-05-01 12:03:04``; the stored text unchanged when it is not an ISO 8601 time."""
        try:
            started = datetime.fromisoformat(self.started)
        except ValueError:
            return self.started
        if started.tzinfo is not None:
            started = started.astimezone()  # to this machine's local time
        now = now or datetime.now()
        if started.date() == now.date():
            return started.strftime("%H:%M:%S")
        return started.strftime("%Y-%m-%d %H:%M:%S")

    def describe(self, now: datetime | None = None) -> str:
        """``pid 1234 on host, started 12:03:04``."""
        return f"pid {self.pid} on {self.host}, started {self.started_text(now)}"


class RunLockedError(RuntimeError):
    """Another masqclip run is writing into the output folder (exit 2 in the CLI). ``str()`` is the one-line
    message; ``out_dir``, ``holder`` (None when the lock file names nobody readable) and ``lock_path`` are kept."""

    def __init__(self, out_dir: Path, holder: LockHolder | None, lock_path: Path, *, unverifiable: bool = False):
        who = holder.describe() if holder is not None else "pid unknown"
        message = f"{out_dir}: another masqclip run ({who}) is writing here; wait for it or use another --out"
        if unverifiable:
            message += f" (if that run is dead, delete {lock_path})"
        super().__init__(message)
        self.out_dir = out_dir
        self.holder = holder
        self.lock_path = lock_path


def _this_holder() -> LockHolder:
    return LockHolder(os.getpid(), socket.gethostname(), datetime.now().astimezone().isoformat(timespec="seconds"))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as alive). Never signals anything: on
    Windows ``os.kill(pid, 0)`` would terminate the process, so it is asked through the Win32 API instead."""
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists, it is not ours
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _plausible(holder: LockHolder | None) -> bool:
    """Whether ``holder`` can be the live holder: a record, and on another host or alive here (a dead pid on this
    host is the previous holder's record, not yet overwritten by the new holder)."""
    return holder is not None and (holder.host != socket.gethostname() or _pid_alive(holder.pid))


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, _MAX_LOCK_BYTES, 0) if hasattr(os, "pread") else _read_path_fallback(fd)


def _read_path_fallback(fd: int) -> bytes:  # pragma: no cover - platforms without pread
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, _MAX_LOCK_BYTES)


def _read_path(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_LOCK_BYTES)
    except OSError:
        return None


def read_lock_holder(out_dir: str | os.PathLike[str]) -> LockHolder | None:
    """What ``<out_dir>/.masqclip/lock`` says (holder or last holder), None when there is no readable record. Says
    nothing about whether the lock is held now."""
    data = _read_path(Path(out_dir) / LOCK_FILE)
    return LockHolder.from_bytes(data) if data is not None else None


class RunLock:
    """The run lock of one output folder (see the module docstring): a context manager, or :meth:`acquire` /
    :meth:`release`. Not re-entrant: a second :class:`RunLock` on the same folder in the same process is refused like
    another process."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.lock_path = self.out_dir / LOCK_FILE
        self._fd: int | None = None
        self._mode: str | None = None  # "flock", "exclusive" or "read-only" while acquired
        self._holder: LockHolder | None = None

    # --- state -----------------------------------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (acquired for writing; False in the read-only state)."""
        return self._mode in ("flock", "exclusive")

    @property
    def read_only(self) -> bool:
        """Whether :meth:`acquire` found the folder read-only to this process: nothing is locked, and the caller must
        write nothing under the folder (no writer of ours can run there; other writers are checked)."""
        return self._mode == "read-only"

    @property
    def mode(self) -> str | None:
        """``"flock"``, ``"exclusive"`` (the ``O_EXCL`` fallback), ``"read-only"``, or None when not acquired."""
        return self._mode

    # --- acquire / release -----------------------------------------------------------------------------------------

    def acquire(self) -> RunLock:
        """Take the lock, creating ``<out>/.masqclip/`` as needed. Returns self. Raises :class:`RunLockedError` when
        another live run holds it, :class:`OSError` for other failures (not a folder, disk errors); a folder that is
        read-only to us gives the :attr:`read_only` state instead of an error."""
        if self._mode is not None:
            raise RuntimeError(f"{self.out_dir}: run lock already acquired by this object")
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRNOS:
                raise
            return self._enter_read_only()
        if _fcntl is not None:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                if exc.errno not in _READ_ONLY_ERRNOS:
                    raise
                return self._enter_read_only()
            if self._acquire_flock(fd):
                return self
        return self._acquire_exclusive()

    def release(self) -> None:
        """Give the lock back (no-op when not acquired). The flock lock file stays, emptied; the fallback's is
        deleted. Nothing else under the folder is touched."""
        mode, fd = self._mode, self._fd
        self._mode, self._fd, self._holder = None, None, None
        if fd is None:
            return
        try:
            if mode == "flock":
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                with contextlib.suppress(OSError):
                    _fcntl.flock(fd, _fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if mode == "exclusive":
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten release must not leak the descriptor (the kernel lock goes with it)
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(Exception):
                self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.out_dir)!r}, mode={self._mode!r})"

    # --- internals -------------------------------------------------------------------------------------------------

    def _refused(self, holder: LockHolder | None, *, unverifiable: bool = False) -> RunLockedError:
        return RunLockedError(self.out_dir, holder, self.lock_path, unverifiable=unverifiable)

    def _acquire_flock(self, fd: int) -> bool:
        """flock on ``fd`` (kept on success); False (``fd`` closed) when the filesystem does not do flock."""
        deadline = time.monotonic() + _SETTLE_S
        try:
            while True:
                try:
                    _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno in _NO_FLOCK_ERRNOS:
                        os.close(fd)
                        return False
                    raise
                holder = LockHolder.from_bytes(_read_fd(fd))
                if _plausible(holder):
                    raise self._refused(holder)
                if time.monotonic() >= deadline:  # a dead pid's record is not the holder's: name nobody
                    raise self._refused(None)
                time.sleep(_POLL_S)  # the new holder has not written its details yet, or has just released
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._fd, self._mode, self._holder = fd, "flock", _this_holder()
        # best effort: the details only word other processes' messages, the lock itself is already ours
        with contextlib.suppress(OSError):
            data = (self._holder.to_json() + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            if hasattr(os, "pwrite"):
                os.pwrite(fd, data, 0)
            else:  # pragma: no cover - the descriptor is fresh: its offset is 0
                os.write(fd, data)
            os.fsync(fd)
        return True

    def _acquire_exclusive(self) -> RunLock:
        """The ``O_CREAT | O_EXCL`` fallback, taking over stale lock files."""
        deadline = time.monotonic() + _SETTLE_S
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        while True:
            try:
                fd = os.open(self.lock_path, flags, 0o666)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in _READ_ONLY_ERRNOS:
                    raise
                return self._enter_read_only()
            else:
                self._fd, self._mode, self._holder = fd, "exclusive", _this_holder()
                try:
                    os.write(fd, (self._holder.to_json() + "\n").encode("utf-8"))
                    os.fsync(fd)
                except BaseException:
                    self.release()
                    raise
                return self
            data = _read_path(self.lock_path)
            if data is None:  # gone between our create and our read: try again
                continue
            holder = LockHolder.from_bytes(data)
            if holder is not None:
                if holder.host != socket.gethostname():
                    raise self._refused(holder, unverifiable=True)
                if _pid_alive(holder.pid):
                    raise self._refused(holder)
                if not self._remove_stale(holder):  # its holder is dead
                    return self._enter_read_only()
                continue
            if self._lock_file_age() >= _ABANDONED_S:  # empty or garbage, and not being written: abandoned
                if not self._remove_stale(None):
                    return self._enter_read_only()
                continue
            if time.monotonic() >= deadline:
                raise self._refused(None)
            time.sleep(_POLL_S)

    def _lock_file_age(self) -> float:
        try:
            return time.time() - self.lock_path.stat().st_mtime
        except OSError:
            return 0.0

    def _remove_stale(self, holder: LockHolder | None) -> bool:
        """Delete a stale fallback lock file; False when the folder is read-only to us."""
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRNOS:
                raise
            if os.name == "nt":  # pragma: no cover - Windows: a live holder keeps the file open, so it cannot go
                raise self._refused(holder) from None
            return False
        return True

    def _enter_read_only(self) -> RunLock:
        """The folder is read-only to us: check that no writer holds an existing lock file, then lock nothing."""
        checked = False  # whether a flock probe could tell
        if _fcntl is not None:
            try:
                fd = os.open(self.lock_path, os.O_RDONLY)
            except OSError:
                fd = None  # no lock file (or unreadable): no run can hold it
                checked = True
            if fd is not None:
                deadline = time.monotonic() + _SETTLE_S
                try:
                    while True:
                        try:
                            _fcntl.flock(fd, _fcntl.LOCK_SH | _fcntl.LOCK_NB)
                            _fcntl.flock(fd, _fcntl.LOCK_UN)
                            checked = True
                            break
                        except BlockingIOError:
                            pass
                        except OSError:
                            break  # no flock on this filesystem: read the record instead
                        holder = LockHolder.from_bytes(_read_fd(fd))
                        if _plausible(holder):
                            raise self._refused(holder)
                        if time.monotonic() >= deadline:
                            raise self._refused(None)
                        time.sleep(_POLL_S)
                finally:
                    os.close(fd)
        if not checked:  # the fallback's lock file: a record names its holder
            data = _read_path(self.lock_path)
            holder = LockHolder.from_bytes(data) if data else None
            if holder is not None and (holder.host != socket.gethostname() or _pid_alive(holder.pid)):
                raise self._refused(holder, unverifiable=holder.host != socket.gethostname())
        self._mode = "read-only"
        return self
