"""An exclusive lock on a folder (a run directory), so that two runs never interleave
their files. The kernel's `flock` is the lock: it dies with its process, so the lock of a
killed run is taken over by the next one without any clean-up. The lock file names the
holder for the message a second run gets."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


class LockedError(ValueError):
    """The folder is in use by another live process."""


class FolderLock:
    """`with FolderLock(lock_file): ...` holds the lock file exclusively (non-blocking);
    the folder it sits in is what it protects."""

    def __init__(self, lock_file: str | Path):
        self.path = Path(lock_file)
        self.fd: int | None = None
        self.previous: dict | None = None  # the holder recorded by a run that died

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link: the holder's record would overwrite its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if not self.path.is_symlink():
                raise
            raise LockedError(f"{self.path} is a symbolic link to "
                              f"{os.readlink(self.path)}; remove it") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since "
                   f"{holder.get('started')} ({holder.get('command')})" if holder else
                   "another process")
            raise LockedError(f"{self.path.parent} is in use by {who}; wait for it to "
                              "finish or use another output directory") from None
        self.previous = _read(fd) or None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
