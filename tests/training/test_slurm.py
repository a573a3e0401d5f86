"""SLURM: main.py under srun (one task per GPU) takes its rank, world size, local rank and rendezvous address from
SLURM's variables, and scripts/slurm/train.sbatch saves and requeues itself on the preemption signal, then resumes.

No SLURM here: the launch runs two local processes over gloo with the variables srun sets
(tests/training/slurm_fakes/srun), and scontrol is a fake that records its arguments."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from image_classification.training.distributed import (
    apply_slurm_environment,
    expand_hostlist,
    slurm_launch_environment,
)
from image_classification.training.logger import read_raport

REPO = Path(__file__).resolve().parents[2]
FAKES = Path(__file__).resolve().parent / "slurm_fakes"
SRUN_TASK = {"SLURM_JOB_ID": "731", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "4"}


@pytest.mark.parametrize("hostlist,hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[07-09]", ["gpu07", "gpu08", "gpu09"]),
    ("gpu[7,9-10],cpu-a1", ["gpu7", "gpu9", "gpu10", "cpu-a1"]),
    ("rack1-n[001-002]-ib", ["rack1-n001-ib", "rack1-n002-ib"]),
])
def test_expand_hostlist(hostlist: str, hosts: list) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist,message", [
    ("node[a-b]", r"'a-b' in brackets is not a number"), ("node[03-01]", r"the range '03-01' runs backwards"),
    ("node[1,x]", r"'x' in brackets is not a number"), ("", "no host name in it"),
])
def test_a_malformed_hostlist_is_one_line_naming_it(hostlist: str, message: str) -> None:
    """'node[a-b]' was a ValueError from int() deep in the expansion, 'node[03-01]' an IndexError."""
    with pytest.raises(ValueError, match=rf"malformed SLURM node list '{re.escape(hostlist)}': {message}"):
        expand_hostlist(hostlist)


@pytest.mark.parametrize("variables,message", [
    ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID=3 is outside the job: it must be >= 0 and "
                                                         "below SLURM_STEP_NUM_TASKS=2"),
    ({"SLURM_PROCID": "-1", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID=-1 is outside the job"),
    ({"SLURM_PROCID": "abc", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID='abc' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "0"}, "SLURM_STEP_NUM_TASKS=0 is outside the job: it must be >= 1"),
])
def test_srun_variables_outside_the_job_are_named(variables: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        slurm_launch_environment(variables)


@pytest.mark.parametrize("variables,message", [
    ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "1"}, "SLURM_PROCID=3 is outside the job"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "node[a-b]"},
     "malformed SLURM node list 'node[a-b]'"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "0"}, "SLURM_STEP_NUM_TASKS=0 is outside the job"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     "MASTER_PORT='abc' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"},
     "RANK=2 is outside the job"),
])
def test_main_refuses_a_rank_outside_the_job_in_one_line(variables: dict, message: str, tmp_path: Path) -> None:
    """Each waited for the --dist-timeout and ended in a 28-70 line DistNetworkError traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    env.update(variables)
    args = [sys.executable, "main.py", "--data-backend", "synthetic", "--arch", "cifar_resnet20", "--num-classes",
            "10", "--image-size", "32", "-b", "4", "--no-autotune", "--epochs", "1", "--prof", "1",
            "--training-only", "--no-checkpoints", "--workspace", str(tmp_path / "w"), "--dist-timeout", "15"]
    started = time.monotonic()
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "w").exists()


def test_an_srun_task_gets_torchruns_variables() -> None:
    assert slurm_launch_environment(SRUN_TASK) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 731)}
    env = dict(SRUN_TASK, MASTER_PORT="29400")
    assert apply_slurm_environment(env) and env["MASTER_PORT"] == "29400" and env["RANK"] == "3"


def test_torchrun_and_the_batch_script_itself_are_left_alone() -> None:
    assert slurm_launch_environment(dict(SRUN_TASK, RANK="0", WORLD_SIZE="8")) is None  # torchrun inside srun
    batch_script = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    assert slurm_launch_environment(batch_script) is None  # `python main.py` straight in the sbatch script
    assert slurm_launch_environment({}) is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sbatch(workspace: Path, log: Path, extra: list, **more_env: str) -> subprocess.Popen:
    """scripts/slurm/train.sbatch as SLURM would start it for a 2-task job on this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    env.update(more_env)
    env.update(PATH=f"{FAKES}:{env['PATH']}", PYTHON=sys.executable, FAKE_SCONTROL_LOG=str(log), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
               SLURM_SUBMIT_DIR=str(REPO), MASTER_PORT=str(_free_port()))
    args = ["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--image-size", "16", "--num-classes", "3",
            "-b", "2", "-j", "0", "--lr", "0.05", "--seed", "1", "-p", "1", "--no-autotune", "--dist-timeout", "60",
            *extra]
    return subprocess.Popen(["bash", "scripts/slurm/train.sbatch", str(workspace), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(job: subprocess.Popen, timeout: float) -> str:
    """The job's output once it exits; past ``timeout`` its whole process group is killed and the test fails with
    the output's tail (a hung rank would otherwise wait for the collective timeout)."""
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, _ = job.communicate()
        pytest.fail(f"the sbatch job did not finish in {timeout} s; its output ends with:\n{out[-4000:]}")
    return out


def test_a_failed_requeue_fails_the_job(tmp_path: Path) -> None:
    """With an scontrol that refuses ('Requeue not permitted'), USR1 to the batch shell ended the script with exit 0:
    the job showed COMPLETED with training unfinished."""
    workspace, log = tmp_path / "ws", tmp_path / "scontrol.log"
    job = _sbatch(workspace, log, ["--epochs", "1", "--prof", "400"], FAKE_SCONTROL_FAIL="1")
    assert job.stdout is not None
    first = job.stdout.readline()
    assert first.startswith("[slurm] job 4242"), first
    job.send_signal(signal.SIGUSR1)
    out = first + _finish(job, 120)
    assert job.returncode == 1, out
    assert "scontrol requeue 4242 failed (exit 1" in out and "training is NOT finished; resubmit" in out
    assert log.read_text().split() == ["requeue", "4242"]


@pytest.mark.slow
def test_two_tasks_train_then_save_requeue_and_resume_on_the_preemption_signal(tmp_path: Path) -> None:
    workspace, log = tmp_path / "ws", tmp_path / "scontrol.log"
    # 2 epochs of 40 iterations: long enough that SIGUSR1 lands mid-epoch
    job = _sbatch(workspace, log, ["--epochs", "2", "--prof", "40"])
    seen = []
    deadline = time.monotonic() + 150
    assert job.stdout is not None
    for line in job.stdout:  # wait until both ranks train
        seen.append(line)
        if "Epoch 0 train [3/" in line or time.monotonic() > deadline:
            break
    job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@300 goes to the batch shell
    out = _finish(job, 150)
    first = "".join(seen) + out
    assert job.returncode == 0, first[-3000:]
    assert "[slurm] SIGUSR1 received: asking main.py to save a checkpoint" in first
    assert "SIGTERM received at epoch 0" in first, first[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    assert (workspace / "checkpoint.pth.tar").exists()
    # the requeued job: the same script and arguments, continuing from the checkpoint to the end
    job = _sbatch(workspace, log, ["--epochs", "2", "--prof", "40"])
    out = _finish(job, 240)
    assert job.returncode == 0, out[-3000:]
    assert "[rank 0] finished: 2/2 epochs" in out and "[rank 1] finished: 2/2 epochs" in out
    assert f"main.py: resuming from {workspace}/checkpoint.pth.tar at epoch 0, iteration" in out
    assert "[slurm] main.py finished with exit status 0" in out
    assert log.read_text().split() == ["requeue", "4242"]  # not requeued again
    stopped = int(re.search(r"SIGTERM received at epoch 0 iteration (\d+)", first).group(1))
    steps = [int(n) for n in re.findall(r"Epoch 0 train \[(\d+)/40\]", out)]
    assert steps and min(steps) >= stopped and stopped + 1 in steps, out[:2000]  # continues after the saved step
    # the epoch's summary covers all 40 iterations (both runs' share), as their per-iteration records (-p 1, 4 images
    # each over the two ranks) say, not only those after the resume
    records = [r for r in read_raport(workspace / "raport.json") if r["type"] == "LOG" and isinstance(r["step"], list)]
    per_iteration = {r["step"][1]: r["data"] for r in records if r["step"][:1] == [0] and len(r["step"]) == 2}
    summary = next(r["data"] for r in records if r["step"] == [0] and "train.loss" in r["data"])
    assert sorted(per_iteration) == list(range(1, 41))
    for metric in ("train.loss", "train.top1"):
        whole = sum(d[metric] for d in per_iteration.values()) / 40
        assert summary[metric] == pytest.approx(whole, rel=1e-6), metric


def test_sbatch_script_and_setup_refuse_bad_arguments_in_one_line() -> None:
    job = subprocess.run(["bash", "scripts/slurm/train.sbatch"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert job.returncode == 2 and job.stderr.strip() == (
        "usage: sbatch scripts/slurm/train.sbatch WORKSPACE [main.py arguments ...]")
    setup = subprocess.run(["bash", "scripts/setup_env.sh", "--oldest"], cwd=REPO, capture_output=True, text=True,
                           timeout=30)
    assert setup.returncode == 2
    assert setup.stderr.strip() == "[setup] error: unknown argument --oldest (valid: --oldest-torch)"
