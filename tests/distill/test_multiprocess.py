"""`turbokit distill` under `accelerate launch` with 2 CPU processes (DDP over gloo) ends in sync.

How the processes are started, and why this way: `accelerate launch --cpu --num_processes 2` starts
ONE process (accelerate's multi-CPU mode expects `mpirun` to start the others, via
`--mpirun_hostfile`). `accelerate launch --multi_gpu --num_processes 2` starts two through
torchrun, but on a machine without GPUs each then trains alone (DistributedType.NO: two
independent runs writing to one folder). With `ACCELERATE_USE_CPU=true` in the environment the same
torchrun launch gives accelerate's MULTI_CPU mode: one process group over gloo, DDP-wrapped student
and discriminator heads. That is what this test runs; the worker records which mode it got.

The worker (tests/distill/ddp_worker.py) hashes each process's own in-memory student after
`train()` returns; the test checks that both hashes are equal, that they equal the exported
student's, that the student moved away from the teacher, and that the processes read disjoint
slices of each global batch. (Checked by hand that the test can fail: with the models left
unwrapped, i.e. no DDP gradient averaging, the two students' hashes differ after 2 steps.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from turbokit.loading import load_model

WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT_S = 300  # a run takes ~15 s here; this only stops a hung process group from hanging CI


def _worker_module():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(args: list[str], home: Path, log: Path) -> int:
    """`accelerate launch` 2 CPU processes; the whole process group is killed if it outlives TIMEOUT_S."""
    scratch = home.parent / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "TMPDIR": str(scratch),  # torchelastic's log folders (torchelastic_*) stay out of /tmp
        "ACCELERATE_USE_CPU": "true",  # see the module docstring: without it each process trains alone
        "OMP_NUM_THREADS": "1",  # two processes share the runner's cores
        "HF_HOME": str(home),  # no user-level accelerate default_config.yaml can change the launch
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "--main_process_port=0",  # a free port: parallel test runs do not collide
        str(WORKER),
        *args,
    ]
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return -1
        finally:  # timed out, or pytest interrupted: torchrun gives each worker a session of its own, so
            if proc.poll() is None:  # killing the launcher's process group would orphan them, still running
                _kill_tree(proc.pid)
                proc.wait()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (found before any is killed, while they are still its children)."""
    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=10)


@pytest.mark.parametrize("method", ["ladd", "add"])
def test_two_cpu_processes_end_with_identical_students(method, tiny_models, images, dino, tmp_path):
    out = tmp_path / "run"
    args = [str(out), method, str(tiny_models["sd2"]), str(images)] + ([str(dino)] if method == "add" else [])
    log = tmp_path / "launch.log"
    code = _launch(args, tmp_path / "hf-home", log)
    tail = log.read_text(errors="replace")[-4000:]
    assert code == 0, f"accelerate launch exited {code} (-1: timed out after {TIMEOUT_S} s):\n{tail}"

    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    for r, info in enumerate(ranks):
        assert info["rank"] == r and info["world_size"] == 2, info
        assert info["distributed_type"] == "MULTI_CPU" and info["backend"] == "gloo", info
        assert info["student_wrapped_in"] == "DistributedDataParallel", info

    digests = [(out / f"rank-{r}.sha256").read_text().strip() for r in range(2)]
    assert digests[0] == digests[1], "the students of the two processes diverged"
    assert ranks[0]["heads_sha256"] == ranks[1]["heads_sha256"], "the discriminator heads diverged"

    worker = _worker_module()

    def unet_digest(path: Path) -> str:
        model = load_model(path, allow_pickle=False, dtype=torch.float32, vae_dtype=torch.float32)
        return worker.state_digest(model.components["unet"])

    assert unet_digest(out / "student") == digests[0], "the exported student is not the one in memory"
    assert unet_digest(tiny_models["sd2"]) != digests[0], "the student did not train"

    # 2 steps × 2 processes × batch 2 = the 8 images once: each process its own half, no overlap.
    seen = [info["captions"] for info in ranks]
    assert all(len(c) == 4 for c in seen), seen
    assert not set(seen[0]) & set(seen[1]), f"both processes trained on {set(seen[0]) & set(seen[1])}"
    assert sorted(seen[0] + seen[1]) == sorted(p.read_text() for p in images.glob("*.txt"))
