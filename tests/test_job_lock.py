"""The job lock: one writer per job directory, a dead holder's lock taken over, another host's refused."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from llmpalette.errors import JobError
from llmpalette.jobs.files import remove_temporaries
from llmpalette.jobs.lock import LOCK, JobLock
from tests.conftest import REPO

HOLDER = """
import sys
from llmpalette.jobs.lock import JobLock
with JobLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of a job directory; returns the Popen (killed at the end)."""
    started = []

    def start(job_dir):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(job_dir)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env)
        started.append(process)
        assert process.stdout.readline() == "held\n"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_acquire_records_the_holder_and_release_leaves_nothing(tmp_path):
    job = tmp_path / "runs" / "job"
    with JobLock(job) as lock:
        assert lock.path == job / LOCK
        record = json.loads((job / LOCK).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["started"].endswith("Z")
    assert not (tmp_path / "runs").exists()  # the folders the lock created, still empty, are gone again

    job.mkdir(parents=True)
    (job / "manifest.json").write_text("{}")
    with JobLock(job):
        pass
    assert sorted(p.name for p in job.iterdir()) == ["manifest.json"]
    lock = JobLock(job)
    lock.release()  # not held: nothing to do
    with lock:  # a released lock can be taken again
        assert (job / LOCK).exists()
    assert not (job / LOCK).exists()


def test_folder_the_job_wrote_into_is_kept(tmp_path):
    job = tmp_path / "job"
    with JobLock(job):
        (job / "manifest.json").write_text("{}")
    assert sorted(p.name for p in job.iterdir()) == ["manifest.json"]


def test_held_by_another_process_is_refused_naming_it(tmp_path, holder):
    job = tmp_path / "job"
    process = holder(job)
    started = json.loads((job / LOCK).read_text())["started"]
    with pytest.raises(JobError) as refused:
        JobLock(job).acquire()
    assert str(refused.value) == (f"job {job} is being written by pid {process.pid} on {socket.gethostname()} since "
                                  f"{started}; wait for it, or stop it (kill {process.pid}) before --resume")
    assert json.loads((job / LOCK).read_text())["pid"] == process.pid  # the refused one changed nothing

    process.stdin.close()  # the holder releases it and ends
    assert process.wait(timeout=30) == 0
    assert not job.exists()  # it created the folder, and removed it again with its lock
    with JobLock(job):
        assert json.loads((job / LOCK).read_text())["pid"] == os.getpid()


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path):
    job = tmp_path / "job"
    with JobLock(job):
        with pytest.raises(JobError, match=f"being written by pid {os.getpid()} "):
            JobLock(job).acquire()
        assert (job / LOCK).exists()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, holder, caplog):
    job = tmp_path / "job"
    process = holder(job)
    started = json.loads((job / LOCK).read_text())["started"]
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert json.loads((job / LOCK).read_text())["pid"] == process.pid  # left behind
    with caplog.at_level(logging.WARNING, logger="llmpalette"):
        with JobLock(job):
            assert json.loads((job / LOCK).read_text())["pid"] == os.getpid()
    assert [r.getMessage() for r in caplog.records] == [
        f"job {job}: taking over the lock of pid {process.pid} on {socket.gethostname()} since {started}, "
        "which ended without releasing it"]
    assert list(job.iterdir()) == []


def test_lock_left_by_another_host_is_refused_with_how_to_remove_it(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    left = {"pid": 4321, "host": "other-node", "started": "2025-01-02T03:04:05Z"}
    (job / LOCK).write_text(json.dumps(left))
    with pytest.raises(JobError) as refused:
        JobLock(job).acquire()
    assert str(refused.value) == (
        f"job {job} is locked by pid 4321 on other-node since 2025-01-02T03:04:05Z; if it is still running there, "
        f"wait for it or stop it (kill 4321 on other-node); if that job is dead, remove {job / LOCK} and retry")
    assert json.loads((job / LOCK).read_text()) == left
    (job / LOCK).unlink()
    with JobLock(job):
        pass


def test_release_keeps_a_lock_file_that_is_no_longer_ours(tmp_path):
    job = tmp_path / "job"
    lock = JobLock(job)
    lock.acquire()
    theirs = job / "theirs"
    theirs.write_text('{"pid": 1, "host": "h", "started": "t"}')
    os.replace(theirs, job / LOCK)
    lock.release()
    assert (job / LOCK).read_text() == '{"pid": 1, "host": "h", "started": "t"}'


def test_job_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "job"
    path.write_text("x")
    with pytest.raises(JobError, match=f"--job-dir {path} is a file, not a folder"):
        JobLock(path).acquire()
    with pytest.raises(JobError, match=f"--job-dir {path / 'sub'} cannot be a folder \\(its parent {path} is a file\\)"):
        JobLock(path / "sub").acquire()


def test_the_lock_is_not_a_temporary(tmp_path):
    job = tmp_path / "job"
    with JobLock(job):
        (job / "a.safetensors.tmp-123").write_bytes(b"x")
        assert remove_temporaries(job) == [job / "a.safetensors.tmp-123"]
        assert (job / LOCK).exists()
