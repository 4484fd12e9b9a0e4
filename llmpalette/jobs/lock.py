"""One writer per job directory: `JOB/.lock`, held with `flock` by the process that writes the job.

The kernel releases a `flock` when its holder dies (even by SIGKILL), so on one host a lock is never
stale: if the lock can be taken, nobody holds it. The file also records who took it (pid, host, start
time) for the message a second writer gets, and is removed on release. A file still naming a process
after the lock was taken therefore means its holder died without releasing it: from this host that is
taken over with a warning; from another host (a shared filesystem, where `flock` may not reach across
hosts) it is refused, since only that host can tell whether its job is still running.

Rank 0 takes the lock before its first check of the job directory and holds it until the job ends;
the other ranks write only what rank 0 tells them to and take no lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from llmpalette.errors import JobError

log = logging.getLogger("llmpalette")

LOCK = ".lock"


class JobLock:
    """The lock of a job directory, as a context manager; the folder is created if it does not exist.

    Args:
        job_dir: the job directory. If taking the lock created it (and its missing parents) and they are
            still empty when the lock is released, they are removed again: a start that fails its checks
            leaves nothing behind.

    Raises JobError on acquire when another live process holds the lock, or when the lock file names a
    process on another host.

    Example:
        with JobLock("jobs/default"):
            ...  # the only writer of jobs/default
    """

    def __init__(self, job_dir: str | Path):
        self.job_dir = Path(job_dir)
        self.path = self.job_dir / LOCK
        self._fd: int | None = None
        self._created: list[Path] = []  # folders acquire created, innermost first

    def __enter__(self) -> "JobLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise JobError naming who holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this JobLock")
        try:
            self._fd = self._lock_file()
        except BaseException:
            self._remove_created_folders()
            raise

    def release(self) -> None:
        """Remove the lock file if it is still ours, then unlock. A no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):  # unlink before unlocking: nobody can have locked our file meanwhile
                os.unlink(self.path)
            else:
                log.warning("%s was replaced by another process; left it in place", self.path)
        finally:
            os.close(fd)
        self._remove_created_folders()

    # -- internals ------------------------------------------------------------------------------------
    def _make_folder(self) -> None:
        missing = [p for p in (self.job_dir, *self.job_dir.parents) if not p.exists()]
        try:
            self.job_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in (self.job_dir, *self.job_dir.parents) if p.exists() and not p.is_dir()), self.job_dir)
            where = "" if blocker == self.job_dir else f" (its parent {blocker} is a file)"
            raise JobError(f"--job-dir {self.job_dir} cannot be a folder{where}" if where else
                           f"--job-dir {self.job_dir} is a file, not a folder") from None
        except OSError as e:
            raise JobError(f"cannot create job {self.job_dir}: {e.strerror}") from None
        if missing:
            self._created = missing

    def _remove_created_folders(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # no longer empty (the job wrote into it), or gone
                break
        self._created = []

    def _lock_file(self) -> int:
        """An open descriptor holding the flock of the file now at self.path, with our record written in it."""
        while True:
            self._make_folder()  # on a retry too: a holder that created the folder removes it with its lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise JobError(f"cannot open the lock of job {self.job_dir} ({self.path}): {e.strerror}") from None
            try:
                locked = _try_flock(fd, self)
                if locked and _same_file(fd, self.path):
                    _take(fd, self)
                    return fd
                holder = None if locked else _wait_for_record(fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not locked:
                raise JobError(_busy_message(self.job_dir, holder))
            # else its holder released (removed) the file between our open and our flock: open it again


def _try_flock(fd: int, lock: JobLock) -> bool:
    """True when we hold the flock now, False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            return False
        raise JobError(f"cannot lock job {lock.job_dir} ({lock.path}): {e.strerror}; "
                       "its filesystem must support flock") from None


def _take(fd: int, lock: JobLock) -> None:
    """We hold the flock: refuse or take over a record left behind, then write ours."""
    left = _read_record(fd)
    if left is not None and left["host"] != socket.gethostname():
        raise JobError(
            f"job {lock.job_dir} is locked by pid {left['pid']} on {left['host']} since {left['started']}; "
            f"if it is still running there, wait for it or stop it (kill {left['pid']} on {left['host']}); "
            f"if that job is dead, remove {lock.path} and retry"
        )
    if left is not None:
        log.warning("job %s: taking over the lock of pid %s on %s since %s, which ended without releasing it",
                    lock.job_dir, left["pid"], left["host"], left["started"])
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = (json.dumps(record) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_record(fd: int) -> dict | None:
    """The {pid, host, started} in the lock file, or None when it is empty or unreadable."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not {"pid", "host", "started"} <= record.keys():
        return None
    return record


def _wait_for_record(fd: int, seconds: float = 1.0) -> dict | None:
    """The holder's record; it writes it just after taking the lock, so an empty file is worth a short wait."""
    deadline = time.monotonic() + seconds
    while (record := _read_record(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return record


def _busy_message(job_dir: Path, holder: dict | None) -> str:
    if holder is None:
        return f"job {job_dir} is being written by another process; wait for it, or stop it before --resume"
    pid, host = holder["pid"], holder["host"]
    kill = f"kill {pid}" if host == socket.gethostname() else f"kill {pid} on {host}"
    return (f"job {job_dir} is being written by pid {pid} on {host} since {holder['started']}; "
            f"wait for it, or stop it ({kill}) before --resume")


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

