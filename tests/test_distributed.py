"""Two gloo processes (torchrun on CPU) produce exactly the single-process job."""
import json
import os
import socket
import subprocess
import sys

from tests.conftest import REPO
from tests.test_jobs import layer_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(folder, worker_source: str) -> None:
    """Write `worker_source` to FOLDER/worker.py and run it as 2 gloo processes (`torchrun`) with FOLDER as
    its argument; the worker saves what it computed there."""
    (folder / "worker.py").write_text(worker_source)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(folder / "worker.py"), str(folder)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_ranks_equal_one_rank(tmp_path, tiny_recipe):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    one = subprocess.run([sys.executable, "-m", "llmpalette", "compress", tiny_recipe, "--job-dir", single, "--quiet", "--no-eval"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    double = tmp_path / "double"
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "llmpalette", "compress", str(tiny_recipe), "--job-dir", str(double), "--quiet", "--no-eval"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr
    assert "on 2 rank(s)" in two.stdout
    assert layer_bytes(double) == layer_bytes(single)
    m1 = json.loads((single / "manifest.json").read_text())
    m2 = json.loads((double / "manifest.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert {n: u["files"] for n, u in m1["stages"][0]["units"].items()} == {n: u["files"] for n, u in m2["stages"][0]["units"].items()}
