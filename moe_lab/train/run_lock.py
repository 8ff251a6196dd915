"""One writer per directory: an exclusive lock file with its holder's PID and host.

`moe-lab train` holds DIR/.moe_lab.lock while it runs; `grow`, `import` and `export`
hold a lock beside the directory they create (PARENT/.NAME.moe_lab.lock: the
directory does not exist yet).  A second writer is refused in one line that names
the holder.  A lock is stale, and taken over with a line that says so, when

  * its holder ran on this host and that PID is gone (kill -9, a crash), or
  * its heartbeat (the file's mtime, touched every HEARTBEAT_S by the holder) is
    older than STALE_S: a holder on another host of a shared filesystem that died
    does not block a resume for ever.

The lock is created with O_CREAT | O_EXCL (atomic on POSIX filesystems).  A take-over
replaces the stale file by rename and reads it back 50 ms later: of two processes
that saw the same stale lock, the one whose file is there goes on.  Not excluded: two
take-overs whose renames and read-backs interleave within those 50 ms (two reruns of
a dead run started in the same instant).  Multi-host runs take one lock, from
process 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

from moe_lab.config.schema import ConfigError

LOCK = ".moe_lab.lock"
HEARTBEAT_S = 30.0
STALE_S = float(os.environ.get("MOE_LAB_LOCK_STALE_S", 300))


def lock_path_in(directory: str) -> str:
    return os.path.join(directory, LOCK)


def lock_path_beside(directory: str) -> str:
    """The lock of a directory that is about to be created (grow / import / export)."""
    parent, name = os.path.split(os.path.abspath(directory))
    return os.path.join(parent, f".{name}{LOCK}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: judged by its age below


def stale_reason(path: str, holder: dict) -> str:
    """'' if the lock at `path` is held, else why it is stale."""
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return f"its holder (pid {pid} on {host}) is gone"
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "it was released"
    if age > STALE_S:
        return f"its heartbeat is {age:.0f} s old (> {STALE_S:.0f} s)"
    return ""


class DirLock:
    """An exclusive lock on `path`; `what` (e.g. "moe-lab train") is shown to others."""

    def __init__(self, path: str, what: str, log=print):
        self.path, self.what, self.log = path, what, log
        self.me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "what": what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def acquire(self) -> DirLock:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released in between: try again
                why = stale_reason(self.path, holder)
                if not why:
                    raise ConfigError(
                        f"{self._target()} is in use by {holder.get('what', 'moe-lab')} (pid "
                        f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                        f"{holder.get('since', '?')}); wait for it to finish"
                    ) from None
                if self._take_over(why):
                    break
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            break
        else:
            raise ConfigError(f"{self._target()}: could not take its lock {self.path}")
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _target(self) -> str:
        base = os.path.basename(self.path)
        if base == LOCK:
            return os.path.dirname(self.path)
        return os.path.join(os.path.dirname(self.path), base[1 : -len(LOCK)])

    def _take_over(self, why: str) -> bool:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.me, f)
        os.replace(tmp, self.path)
        time.sleep(0.05)  # another process taking it over at the same moment wins or loses here
        if _read(self.path) == self.me:
            self.log(f"took over the lock of {self._target()}: {why}")
            return True
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if _read(self.path) == self.me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked(path: str, what: str, *, enabled: bool = True, log=print):
    """`DirLock(path, what)` held inside the block (a no-op where not `enabled`: the
    processes of a multi-host run other than 0)."""
    if not enabled:
        yield None
        return
    with DirLock(path, what, log=log) as lock:
        yield lock
