"""The run lock of an output folder (issue 17, item 1): real processes hold and contend for it."""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from masqclip_cli.io import run_lock
from masqclip_cli.io.files import remove_stale_temp_files
from masqclip_cli.io.run_lock import LOCK_FILE, LockHolder, RunLock, RunLockedError, read_lock_holder

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the tests kill holders with POSIX signals")

REPO = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()

# A process that takes the lock of argv[1], says "<pid> <mode>" and holds it until its stdin closes. With argv[2] ==
# "fallback" it uses the O_EXCL scheme (as on Windows).
HOLDER = """
import os, sys
from masqclip_cli.io import run_lock
if sys.argv[2] == "fallback":
    run_lock._fcntl = None
try:
    lock = run_lock.RunLock(sys.argv[1]).acquire()
except run_lock.RunLockedError as exc:
    print("refused", exc, flush=True)
    sys.exit(3)
print(os.getpid(), lock.mode, flush=True)
sys.stdin.read()
lock.release()
"""

# The message line, with the holder's details as groups.
MESSAGE = (r"(?P<out>.+): another masqclip run \(pid (?P<pid>\d+) on (?P<host>.+), started (?P<time>\d\d:\d\d:\d\d)\)"
           r" is writing here; wait for it or use another --out")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _readline(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the helper process said nothing"
    return proc.stdout.readline().strip()


def _start_holder(out: Path, scheme: str = "flock") -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), scheme], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    line = _readline(proc)
    pid, mode = line.split()
    assert int(pid) == proc.pid
    assert mode == ("exclusive" if scheme == "fallback" else "flock")
    return proc, proc.pid


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: no zombie left to look alive


@pytest.fixture
def holders():
    started: list[subprocess.Popen] = []

    def start(out: Path, scheme: str = "flock") -> tuple[subprocess.Popen, int]:
        proc, pid = _start_holder(out, scheme)
        started.append(proc)
        return proc, pid

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root: file bytes, None for folders."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _seconds(clock: str, day: datetime) -> datetime:
    return datetime.combine(day.date(), datetime.strptime(clock, "%H:%M:%S").time())


# --- two real processes -----------------------------------------------------------------------------------------------


def test_second_process_refused_with_one_line_naming_the_holder(tmp_path, holders):
    out = tmp_path / "out"
    before = datetime.now().replace(microsecond=0)
    proc, pid = holders(out)
    after = datetime.now()

    with pytest.raises(RunLockedError) as info:
        RunLock(out).acquire()
    message = str(info.value)
    assert "\n" not in message
    match = re.fullmatch(MESSAGE, message)
    assert match, message
    assert match["out"] == str(out)
    assert int(match["pid"]) == pid
    assert match["host"] == HOST
    assert before <= _seconds(match["time"], before) <= after
    assert isinstance(info.value, RuntimeError)
    assert info.value.holder is not None and info.value.holder.pid == pid
    assert info.value.out_dir == out

    # the lock file: one JSON line with the holder's pid, host and start time (ISO 8601 with offset)
    text = (out / ".masqclip" / "lock").read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    record = json.loads(text)
    assert set(record) == {"pid", "host", "started"}
    assert record["pid"] == pid and record["host"] == HOST
    started = datetime.fromisoformat(record["started"])
    assert started.utcoffset() is not None
    assert before <= started.astimezone().replace(tzinfo=None) <= after
    assert read_lock_holder(out) == LockHolder(pid, HOST, record["started"])
    _stop(proc)


def test_sigkilled_holder_lock_is_taken_over(tmp_path, holders):
    out = tmp_path / "out"
    proc, pid = holders(out)
    _kill(proc)
    assert read_lock_holder(out).pid == pid  # its record is still there, its lock is not

    lock = RunLock(out).acquire()
    assert lock.held and lock.mode == "flock" and not lock.read_only
    assert read_lock_holder(out).pid == os.getpid()
    # and we really hold it: another process is refused, naming us
    contender = subprocess.run([sys.executable, "-c", HOLDER, str(out), "flock"], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert contender.returncode == 3
    assert re.fullmatch("refused " + MESSAGE, contender.stdout.strip())["pid"] == str(os.getpid())
    lock.release()


def test_release_frees_the_lock_and_keeps_every_other_file(tmp_path):
    out = tmp_path / "out"
    (out / ".masqclip" / "items").mkdir(parents=True)
    (out / ".masqclip" / "run.json").write_text('{"model":"m"}\n')
    (out / ".masqclip" / "items" / "a.jpg.json").write_text("{}\n")
    (out / "instances.json").write_bytes(b'{"images":[]}\n')
    (out / ".instances.json.0123456789ab.tmp").write_bytes(b"partial")
    files_before = _snapshot(out)

    with RunLock(out) as lock:
        assert lock.held
    assert not lock.held and lock.mode is None
    after = _snapshot(out)
    lock_name = str(LOCK_FILE)
    assert after.pop(lock_name) == b""  # the lock file stays, emptied
    assert after == files_before

    # released for real: a new process takes it
    proc, _ = _start_holder(out)
    _stop(proc)


def test_lock_released_when_the_with_block_raises(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyError):
        with RunLock(out):
            raise KeyError("a failing run")
    proc, pid = _start_holder(out)
    assert read_lock_holder(out).pid == pid
    _stop(proc)


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        with pytest.raises(RunLockedError) as info:
            RunLock(out).acquire()
        assert int(re.fullmatch(MESSAGE, str(info.value))["pid"]) == os.getpid()
    with RunLock(out) as again:  # free after the first is released
        assert again.held


def test_processes_started_together_exactly_one_wins(tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "flock"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO) for _ in range(4)]
    try:
        lines = {proc.pid: _readline(proc) for proc in procs}
        winners = [pid for pid, line in lines.items() if not line.startswith("refused")]
        assert len(winners) == 1, lines
        for pid, line in lines.items():
            if pid != winners[0]:
                assert re.fullmatch("refused " + MESSAGE, line)["pid"] == str(winners[0])
    finally:
        for proc in procs:
            _stop(proc)
    assert sorted(proc.returncode for proc in procs) == [0, 3, 3, 3]


def test_start_up_clean_up_never_touches_a_live_runs_temporary_files(tmp_path, holders):
    """The issue's 0.1 s race: run B's start-up (lock, then remove stale temporary files) must not delete run A's
    in-flight ``.instances.json.*.tmp``."""
    out = tmp_path / "out"
    proc, pid = holders(out)
    in_flight = out / ".instances.json.0123456789ab.tmp"
    in_flight.write_bytes(b'{"images":[')

    def start_run() -> list[Path]:
        with RunLock(out):
            return remove_stale_temp_files(out)

    with pytest.raises(RunLockedError):
        start_run()
    assert in_flight.read_bytes() == b'{"images":['
    _kill(proc)  # run A dies: its temporary file is now stale, and the next start removes it
    assert start_run() == [in_flight]
    assert not in_flight.exists()


# --- read-only output folders -------------------------------------------------------------------------------------


def _deny_writes_under(monkeypatch, root: Path, code: int = errno.EROFS) -> None:
    """Make creating folders and opening files for writing under ``root`` fail with ``code``, as on a read-only
    mount (reading still works)."""
    real_open, real_mkdir = os.open, os.mkdir
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def inside(path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(root)

    def fake_open(path, flags, *args, **kwargs):
        if inside(path) and flags & write_flags:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_folder_without_state_folder_gives_read_only_state(tmp_path, monkeypatch, code):
    out = tmp_path / "out"
    out.mkdir()
    (out / "instances.json").write_bytes(b"{}\n")
    before = _snapshot(out)
    _deny_writes_under(monkeypatch, out, code)
    lock = RunLock(out).acquire()
    assert lock.read_only and not lock.held and lock.mode == "read-only"
    lock.release()
    monkeypatch.undo()
    assert _snapshot(out) == before  # nothing created


def test_read_only_folder_with_a_previous_runs_lock_file(tmp_path, monkeypatch, holders):
    out = tmp_path / "out"
    proc, pid = holders(out)
    _kill(proc)  # the last run died: its record stays in an unheld lock file
    before = _snapshot(out)
    _deny_writes_under(monkeypatch, out)
    with RunLock(out) as lock:
        assert lock.read_only
    monkeypatch.undo()
    assert _snapshot(out) == before


def test_read_only_view_of_a_folder_a_live_run_writes_is_refused(tmp_path, monkeypatch, holders):
    """Read-only to us does not mean nobody writes there (a read-only bind mount, another user): a live holder is
    still reported."""
    out = tmp_path / "out"
    proc, pid = holders(out)
    _deny_writes_under(monkeypatch, out)
    with pytest.raises(RunLockedError) as info:
        RunLock(out).acquire()
    assert int(re.fullmatch(MESSAGE, str(info.value))["pid"]) == pid
    _stop(proc)


def test_other_errors_are_not_taken_for_read_only(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file, not a folder")
    with pytest.raises(OSError) as info:
        RunLock(out).acquire()
    assert not isinstance(info.value, RunLockedError)


def _can_bind_mount(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    src, dst = tmp_path / "probe-src", tmp_path / "probe-dst"
    src.mkdir()
    dst.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$1" && ! touch "$1/x" 2>/dev/null',
                            str(src), str(dst)], capture_output=True, timeout=30)
    return probe.returncode == 0


# In a private mount namespace, bind argv[1] read-only onto argv[2] and take the lock of argv[2].
READ_ONLY_RUN = 'mount --bind -o ro "$0" "$1" && exec "$2" -c "$3" "$1"'
READ_ONLY_CHECK = """
import sys
from masqclip_cli.io.run_lock import RunLock, RunLockedError
try:
    with RunLock(sys.argv[1]) as lock:
        print(lock.mode)
except RunLockedError as exc:
    print("refused", exc)
"""


def test_real_read_only_bind_mount(tmp_path, holders):
    if not _can_bind_mount(tmp_path):
        pytest.skip("no read-only bind mount here (needs unshare and mount privileges); the monkeypatched tests "
                    "cover the same paths")
    src, view = tmp_path / "src", tmp_path / "view"
    view.mkdir()
    (src / ".masqclip").mkdir(parents=True)
    (src / ".masqclip" / "run.json").write_text("{}\n")

    def run_read_only() -> str:
        done = subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY_RUN, str(src), str(view), sys.executable,
                               READ_ONLY_CHECK], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    before = _snapshot(src)
    assert run_read_only() == "read-only"
    assert _snapshot(src) == before  # no lock file created

    proc, pid = holders(src)  # a live run writes through the writable path
    match = re.fullmatch("refused " + MESSAGE, run_read_only())
    assert match and int(match["pid"]) == pid and match["out"] == str(view)
    _stop(proc)


@pytest.mark.skipif(os.name == "posix" and os.geteuid() == 0,
                    reason="running as root, where chmod 555 does not stop writes (the bind-mount and monkeypatched "
                           "tests cover read-only folders)")
def test_chmod_555_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "instances.json").write_bytes(b"{}\n")
    before = _snapshot(out)
    out.chmod(0o555)
    try:
        with RunLock(out) as lock:
            assert lock.read_only
    finally:
        out.chmod(0o755)
    assert _snapshot(out) == before


# --- the O_EXCL fallback (no fcntl: Windows) --------------------------------------------------------------------------


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setattr(run_lock, "_fcntl", None)
    monkeypatch.setattr(run_lock, "_SETTLE_S", 0.2)


def test_fallback_holds_refuses_and_deletes_on_release(tmp_path, fallback):
    out = tmp_path / "out"
    lock = RunLock(out).acquire()
    assert lock.mode == "exclusive"
    record = json.loads((out / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == HOST
    with pytest.raises(RunLockedError) as info:
        RunLock(out).acquire()
    assert int(re.fullmatch(MESSAGE, str(info.value))["pid"]) == os.getpid()
    lock.release()
    assert not (out / LOCK_FILE).exists()
    assert (out / ".masqclip").is_dir()


def test_fallback_takes_over_the_lock_of_a_killed_process(tmp_path, fallback, holders):
    out = tmp_path / "out"
    proc, pid = holders(out, "fallback")
    with pytest.raises(RunLockedError) as info:  # alive: refused
        RunLock(out).acquire()
    assert info.value.holder.pid == pid
    _kill(proc)
    assert read_lock_holder(out).pid == pid  # the file survived its holder
    with RunLock(out) as lock:
        assert lock.held and read_lock_holder(out).pid == os.getpid()


def test_fallback_cannot_check_another_host_and_says_which_file_to_delete(tmp_path, fallback):
    out = tmp_path / "out"
    (out / ".masqclip").mkdir(parents=True)
    other = LockHolder(4242, HOST + "-elsewhere", datetime.now().astimezone().isoformat(timespec="seconds"))
    (out / LOCK_FILE).write_text(other.to_json() + "\n")
    with pytest.raises(RunLockedError) as info:
        RunLock(out).acquire()
    message = str(info.value)
    assert message.startswith(f"{out}: another masqclip run (pid 4242 on {HOST}-elsewhere, started ")
    assert message.endswith(f"wait for it or use another --out (if that run is dead, delete {out / LOCK_FILE})")


def test_fallback_empty_lock_file_young_is_refused_old_is_taken_over(tmp_path, fallback):
    out = tmp_path / "out"
    (out / ".masqclip").mkdir(parents=True)
    (out / LOCK_FILE).write_bytes(b"")  # a holder between its create and its write
    with pytest.raises(RunLockedError) as info:
        RunLock(out).acquire()
    assert "another masqclip run (pid unknown) is writing here" in str(info.value)
    old = time.time() - 60
    os.utime(out / LOCK_FILE, (old, old))  # ... or one that died there long ago
    with RunLock(out) as lock:
        assert lock.held and read_lock_holder(out).pid == os.getpid()


def test_fallback_read_only_folder(tmp_path, monkeypatch, fallback):
    out = tmp_path / "out"
    (out / ".masqclip").mkdir(parents=True)
    before = _snapshot(out)
    _deny_writes_under(monkeypatch, out)
    with RunLock(out) as lock:
        assert lock.read_only
    monkeypatch.undo()
    assert _snapshot(out) == before


# --- details ------------------------------------------------------------------------------------------------------


def test_pid_alive_never_signals_and_tells_dead_from_alive():
    assert run_lock._pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not run_lock._pid_alive(child.pid)
    assert not run_lock._pid_alive(0) and not run_lock._pid_alive(-1)


def test_started_text_today_and_other_days(monkeypatch):
    holder = LockHolder(1, "h", "2024-05-01T12:03:04")
    assert holder.started_text(datetime(2024, 5, 1, 23, 59)) == "12:03:04"
    assert holder.started_text(datetime(2024, 5, 2, 0, 1)) == "2024-05-01 12:03:04"
    assert holder.describe(datetime(2024, 5, 1, 13)) == "pid 1 on h, started 12:03:04"
    assert LockHolder(1, "h", "not a time").started_text() == "not a time"
    # a time with an offset is shown in this machine's local time (UTC here: 12:03:04+02:00 is 10:03:04)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert LockHolder(1, "h", "2024-05-01T12:03:04+02:00").started_text(datetime(2024, 5, 1)) == "10:03:04"
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"pid":"1","host":"h","started":"t"}', b'{"pid":0,"host":"h",'
                                  b'"started":"t"}', b'{"pid":true,"host":"h","started":"t"}', b"\xff\xfe",
                                  b'{"pid":1,"host":"h"}'])
def test_from_bytes_rejects_incomplete_records(data):
    assert LockHolder.from_bytes(data) is None


def test_from_bytes_round_trip():
    holder = LockHolder(99, "hôte", "2024-05-01T12:03:04+02:00")
    assert LockHolder.from_bytes((holder.to_json() + "\n").encode("utf-8")) == holder


def test_garbage_in_an_unheld_lock_file_never_blocks_a_run(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    out = tmp_path / "out"
    (out / ".masqclip").mkdir(parents=True)

    @hypothesis.settings(max_examples=40, deadline=None)
    @hypothesis.given(st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
    def check(data: bytes) -> None:
        (out / LOCK_FILE).write_bytes(data)
        with RunLock(out) as lock:  # flock: the content is only advisory
            assert lock.held and read_lock_holder(out).pid == os.getpid()
        assert (out / LOCK_FILE).read_bytes() == b""

    check()


def test_a_refused_process_waits_briefly_for_the_holders_details(tmp_path, holders, monkeypatch):
    """Between a new holder's flock and its write the file still holds the last holder's (dead) record: a contender
    must not name the dead pid; it waits for the live holder's record, or says "pid unknown" after the settle time."""
    import threading

    out = tmp_path / "out"
    proc, pid = holders(out)
    live_record = (out / LOCK_FILE).read_bytes()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = LockHolder(dead.pid, HOST, (datetime.now() - timedelta(hours=1)).astimezone().isoformat())

    monkeypatch.setattr(run_lock, "_SETTLE_S", 0.3)
    for content in (stale.to_json() + "\n", ""):  # the previous holder's record, or nothing yet
        (out / LOCK_FILE).write_text(content)
        t0 = time.monotonic()
        with pytest.raises(RunLockedError) as info:
            RunLock(out).acquire()
        assert time.monotonic() - t0 >= 0.3
        assert info.value.holder is None
        assert str(info.value) == (f"{out}: another masqclip run (pid unknown) is writing here; wait for it or use "
                                   "another --out")

    # the holder's record arrives while the contender waits: it is named
    monkeypatch.setattr(run_lock, "_SETTLE_S", 30.0)
    (out / LOCK_FILE).write_text(stale.to_json() + "\n")
    writer = threading.Timer(0.2, (out / LOCK_FILE).write_bytes, args=(live_record,))
    writer.start()
    t0 = time.monotonic()
    with pytest.raises(RunLockedError) as info:
        RunLock(out).acquire()
    writer.join()
    assert 0.2 <= time.monotonic() - t0 < 30.0
    assert info.value.holder.pid == pid
    _stop(proc)
