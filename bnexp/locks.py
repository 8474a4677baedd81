"""The per-run lock: one process trains a run at a time, and others can see which one.

A run's `.lock` is an flock held by the process training it; the kernel releases it when that
process dies, however it dies (kill -9 included), so a free lock on a run whose run.json says
`running` means the run was interrupted. While held, the file names the holder: "<pid> <host>\n".
Light on purpose (no torch): the report reads locks too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


class RunLock:
    """An exclusive, non-blocking flock on a run's `.lock`; the holder writes "<pid> <host>" into it.

    The file is opened without truncating it (a process that fails to get the lock must not erase
    the holder's name), and read-only where this user may not write it (flock needs no write
    access: a run of another user is still locked correctly, just without a holder name)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        if self._fd is not None:
            return True
        flags = getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | flags, 0o666)
        except PermissionError:
            fd = os.open(self.path, os.O_RDONLY | flags)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a read-only descriptor: locked, but nameless
            pass
        return True

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # before unlocking: a new holder's name is never erased
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def is_free(self) -> bool:
        """Whether nobody holds the lock now. Only reads: a shared flock, taken and dropped at once
        (a missing file is free; nothing is created, so a report may call it on any run)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing drops the shared lock, if taken

    def holder(self) -> tuple[int, str] | None:
        """(pid, host) the holder wrote into the lock file, if it could."""
        try:
            pid, host = self.path.read_text().split()
            return int(pid), host
        except (OSError, ValueError):
            return None


def describe_process(pid: int, host: str) -> str:
    """"pid 123 on host h" plus its state when it runs on this host: stopped, gone."""
    where = f"pid {pid} on {host}"
    if host != socket.gethostname():
        return where
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return f"{where} (no such process here)"
    except (OSError, IndexError):
        return where
    if state in ("T", "t"):
        return f"{where} (stopped; `kill -CONT {pid}` resumes it)"
    return where
