"""scripts/: raport collection, the Fashion-MNIST study's bookkeeping and report, the launchers."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional

import pytest
from script_runner import run_script

from image_classification.training.logger import RaportWriter

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _load(name: str) -> ModuleType:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


collect = _load("collect_results")
study = _load("fashion_mnist_study")


def write_raport(path: Path, *, conv: str = "pedconv", epochs: int = 3, done: Optional[int] = None,
                 top1: Optional[Dict[int, float]] = None, extra: Optional[dict] = None, evaluate: bool = False) -> Path:
    """A raport as main.py writes it (same writer): parameters, iterations, epochs, summary."""
    done = epochs if done is None else done
    top1 = top1 or {e: 50.0 + 10 * e for e in range(done)}
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = RaportWriter(str(path))
    params = {"arch": "cifar_resnet20", "conv": conv, "placement": "paper", "seed": 0, "epochs": epochs,
              "evaluate": evaluate, "train_subset": None, "val_subset": None, **(extra or {})}
    writer.log_parameters(params)
    writer.log_metadata()
    for epoch in range(done):
        for it in (5, 10):
            writer.log((epoch, it), {"train.loss": 2.0 / (epoch + 1) / it, "train.total_ips": 100.0 + epoch})
        writer.log((epoch,), {"train.total_ips": 100.0 + epoch, "val.top1": top1[epoch], "val.top5": 99.0,
                              "val.loss": 0.5, "val.compute_latency": 0.002})
    if done == epochs or evaluate:
        writer.log((), {"summary.epochs": done, "summary.best_top1": max(top1.values())} if not evaluate else
                    {"val.top1": top1[0]})
    writer.close()
    return path


# ------------------------------------------------------------------------------ collect_results
def test_summarize_complete_and_partial(tmp_path: Path) -> None:
    full = collect.summarize(write_raport(tmp_path / "a" / "raport.json", top1={0: 60.0, 1: 75.0, 2: 72.5}))
    assert full.complete and full.epochs_done == 3 and full.epochs_planned == 3
    assert full.best_top1 == 75.0 and full.last_top1 == 72.5 and full.best_top5 == 99.0
    assert full.train_ips == pytest.approx(101.0)  # mean of the epoch throughputs 100, 101, 102
    assert full.val_latency_ms == pytest.approx(2.0)
    partial = collect.summarize(write_raport(tmp_path / "b" / "raport.json", epochs=5, done=2))
    assert not partial.complete and partial.epochs_done == 2
    evaluated = collect.summarize(write_raport(tmp_path / "c" / "raport.json", epochs=1, done=1, evaluate=True))
    assert evaluated.complete


def test_truncated_last_line_is_tolerated_but_corruption_is_not(tmp_path: Path) -> None:
    path = write_raport(tmp_path / "raport.json", epochs=2, done=1)
    with open(path, "a") as handle:
        handle.write('DLLL {"type": "LOG", "step": [1, 5], "da')  # killed mid-write
    assert collect.summarize(path).epochs_done == 1
    lines = path.read_text().splitlines()
    lines.insert(2, 'DLLL {"broken"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="raport.json:3"):
        collect.read_raport(path)


def test_collect_cli_writes_markdown_and_csv(tmp_path: Path) -> None:
    write_raport(tmp_path / "runs" / "static" / "raport.json", conv="static", top1={0: 70.0, 1: 80.0, 2: 81.0})
    write_raport(tmp_path / "runs" / "ped" / "raport.json", top1={0: 71.0, 1: 82.0, 2: 83.5})
    (tmp_path / "runs" / "other.json").write_text('{"not": "a raport"}\n')
    md, table_csv = tmp_path / "out" / "r.md", tmp_path / "out" / "r.csv"
    assert collect.main([str(tmp_path / "runs"), "--markdown", str(md), "--csv", str(table_csv)]) == 0
    text = md.read_text()
    assert text.count("\n") == 4 and "| cifar_resnet20 | pedconv | paper |" in text and "83.50" in text
    rows = list(csv.DictReader(table_csv.open()))
    assert {r["conv"] for r in rows} == {"static", "pedconv"}
    assert {float(r["best_top1"]) for r in rows} == {81.0, 83.5}
    assert collect.main(["--complete", str(tmp_path / "runs")]) == 0
    write_raport(tmp_path / "runs" / "unfinished" / "raport.json", epochs=4, done=1)
    assert collect.main(["--complete", str(tmp_path / "runs")]) == 1


def test_robust_top1_of_an_evaluation_under_attack(tmp_path: Path) -> None:
    path = write_raport(tmp_path / "raport_pgd.json", epochs=1, done=1, evaluate=True, top1={0: 60.2})
    with open(path, "a") as handle:  # the summary record main.py --evaluate --attack pgd writes
        handle.write('DLLL {"type": "LOG", "step": [], "data": {"val.top1": 60.2, "val_pgd50.top1": 31.9, '
                     '"val_pgd10.top1": 32.8, "val_ema_pgd10.top1": 40.0, "val_pgd10.linf": 4.0}}\n')
    row = collect.summarize(path)
    assert row.best_top1 == 60.2 and row.robust_top1 == "PGD-10 32.80; PGD-50 31.90" and row.complete
    assert "| PGD-10 32.80; PGD-50 31.90 |" in collect.markdown_table([row])
    assert collect.summarize(write_raport(tmp_path / "plain.json")).robust_top1 == ""


def test_table4_launcher_trains_then_attacks(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "NGPUS": "8", "PYTHON": "python3", "LOGS": str(tmp_path)}
    out = subprocess.run(["bash", str(SCRIPTS / "pedconv_table4.sh"), "--amp"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    commands = [line for line in out.splitlines() if line.startswith("python3 multiproc.py")]
    train = [c for c in commands if "--evaluate" not in c]
    attack = [c for c in commands if "--evaluate" in c]
    assert len(train) == len(attack) == 2
    for command in attack:
        assert "--attack pgd --attack-steps 10 50 --attack-eps 4 --attack-step-size 1" in command
        assert "--raport-file raport_pgd.json" in command and command.rstrip().endswith("--amp")
        name = command.split("--config configs/pedconv_table4/")[1].split(".yaml")[0]
        assert f"--pretrained-weights {tmp_path}/pedconv_table4/{name}/checkpoint.pth.tar" in command


def test_collect_cli_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        collect.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no raport files"):
        collect.main([str(tmp_path)])


# ------------------------------------------------------------------------------ fashion_mnist_study
def test_run_state_drives_resumption(tmp_path: Path) -> None:
    wanted = {"epochs": 3, "seed": 0, "train_subset": None, "val_subset": None}
    assert study.run_state(tmp_path / "none", wanted) == "new"
    write_raport(tmp_path / "done" / "raport.json")
    assert study.run_state(tmp_path / "done", wanted) == "done"
    write_raport(tmp_path / "part" / "raport.json", done=1)
    assert study.run_state(tmp_path / "part", wanted) == "partial"
    assert study.run_state(tmp_path / "done", {**wanted, "epochs": 5}) == "stale"
    assert study.run_state(tmp_path / "done", {**wanted, "train_subset": 1000}) == "stale"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "raport.json").write_text('DLLL {"x"\nDLLL {}\n')
    assert study.run_state(tmp_path / "bad", wanted) == "stale"


def test_study_cli_validation_and_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        study.parse(["--ops", "static,nosuchop", "--dry-run"])
    assert "unknown op 'nosuchop'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.parse(["--data", str(tmp_path / "missing")])
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.parse(["--imagenet-cost", "resnet18,alexnet", "--dry-run"])
    assert "--imagenet-cost: unknown arch 'alexnet'" in capsys.readouterr().err
    assert study.parse(["--imagenet-cost", "resnet18", "--dry-run"]).imagenet_cost == ["resnet18"]
    assert study.parse(["--imagenet-cost", "none", "--dry-run"]).imagenet_cost == []  # the default the help names
    with pytest.raises(SystemExit):
        study.parse(["--seeds", "0", "-1", "--dry-run"])
    assert "--seeds must lie in [0, 4294967295], got 0 -1" in capsys.readouterr().err
    args = study.parse(["--ops", "static,pedconv", "--seeds", "3", "--epochs", "1", "--train-subset", "100",
                        "--logs", str(tmp_path), "--dry-run", "--", "--device", "cpu"])
    assert args.ops == ["static", "pedconv"] and args.val_subset is None and args.main_args == ["--device", "cpu"]
    cmd = study.train_command(args, "pedconv", 3, tmp_path / "w", resume=True)
    assert cmd[1].endswith("main.py") and cmd[cmd.index("--config") + 1].endswith("configs/fashion_mnist/pedconv.yaml")
    assert cmd[cmd.index("--seed") + 1] == "3" and cmd[cmd.index("--train-subset") + 1] == "100"
    assert "--val-subset" not in cmd and cmd[-4:] == ["--resume", "auto", "--device", "cpu"]
    study.run_all(args)
    out = capsys.readouterr().out
    assert out.count("[study]") == 2 and "configs/fashion_mnist/static.yaml" in out


def test_study_command_is_accepted_by_main_parser(tmp_path: Path) -> None:
    from image_classification.training.cli import parse_args

    args = study.parse(["--ops", "pedconv", "--seeds", "1", "--val-subset", "500", "--logs", str(tmp_path),
                        "--dry-run"])
    cmd = study.train_command(args, "pedconv", 1, tmp_path / "w", resume=False)
    parsed = parse_args(cmd[2:])
    assert (parsed.train_subset, parsed.val_subset, parsed.seed, parsed.epochs) == (5000, 500, 1, 2)
    assert parsed.dataset == "fashion-mnist" and parsed.conv == "pedconv"


# ------------------------------------------------------------------------------ shell scripts
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_every_table_launcher_has_recipes() -> None:
    launchers = [p for p in SHELL_SCRIPTS if p.name.startswith(("pedconv_", "dcd_"))]
    assert len(launchers) >= 5
    for launcher in launchers:
        assert (ROOT / "configs" / launcher.stem).is_dir(), launcher


def test_launcher_dry_run_lists_every_recipe(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "NGPUS": "4", "PYTHON": "python3", "LOGS": str(tmp_path)}
    out = subprocess.run(["bash", str(SCRIPTS / "pedconv_table5.sh"), "--only", "^b_", "--amp"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    commands = [line for line in out.splitlines() if line.startswith("python3 multiproc.py")]
    assert len(commands) == 3
    assert all("--nproc_per_node 4 main.py /data/imagenet --config configs/pedconv_table5/b_resnet18_rank" in c
               for c in commands)
    assert all(c.rstrip().endswith("--amp") for c in commands)
    everything = subprocess.run(["bash", str(SCRIPTS / "dcd_table4.sh")], cwd=ROOT, env=env,
                                capture_output=True, text=True, check=True).stdout
    assert everything.count("multiproc.py") == len(list((ROOT / "configs" / "dcd_table4").glob("[!_]*.yaml")))


def test_launcher_errors() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    bad = subprocess.run(["bash", str(SCRIPTS / "run_recipes.sh"), "no_such_table"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no recipe directory configs/no_such_table" in bad.stderr
    nodata = subprocess.run(["bash", str(SCRIPTS / "pedconv_table1.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert nodata.returncode == 2 and "set DATA" in nodata.stderr


def test_loss_curve_and_load_run(tmp_path: Path) -> None:
    write_raport(tmp_path / "w" / "raport.json", epochs=2, top1={0: 70.0, 1: 80.0})
    (tmp_path / "w" / "seconds.txt").write_text("12.5\n")
    run = study.load_run(tmp_path / "w", "pedconv", 0)
    assert [x for x, _ in run.loss_curve] == [0.5, 1.0, 1.5, 2.0]  # iterations 5 and 10 of 10 per epoch
    assert run.loss_curve[0][1] == pytest.approx(0.4)
    assert (run.top1, run.best_top1, run.seconds, run.epoch_top1) == (80.0, 80.0, 12.5, {0: 70.0, 1: 80.0})
    (tmp_path / "empty").mkdir()
    RaportWriter(str(tmp_path / "empty" / "raport.json")).close()
    with pytest.raises(ValueError, match="no val.top1"):
        study.load_run(tmp_path / "empty", "static", 0)


def _fake_python(tmp_path: Path, body: str) -> Path:
    """An executable standing in for the interpreter that runs main.py: ``args`` holds main.py's flags and
    ``RaportWriter`` is imported; ``body`` does the rest."""
    fake = tmp_path / "fake_python.py"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                    "from image_classification.training.logger import RaportWriter\nargs = sys.argv[2:]\n" + body)
    fake.chmod(0o755)
    return fake


def test_study_exits_2_with_one_line_error_on_a_run_without_results(tmp_path: Path) -> None:
    """A training that exits 0 but logs no test top-1: the reporting package raises ValueError, the script
    prints ``error: ...`` (one line, no traceback) and exits with status 2."""
    fake = _fake_python(tmp_path, "RaportWriter(args[args.index('--workspace') + 1] + '/raport.json').close()\n")
    argv = ["--ops", "static", "--seeds", "0", "--epochs", "1", "--train-subset", "100", "--logs",
            str(tmp_path / "logs"), "--python", str(fake), "--data", str(tmp_path), "--out", str(tmp_path / "out")]
    done = run_script(str(SCRIPTS / "fashion_mnist_study.py"), argv, cwd=ROOT)
    raport = tmp_path / "logs" / "e1-train100-testall" / "static" / "seed0" / "raport.json"
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {raport} holds no val.top1 record (did the run fail?)"]
    assert not (tmp_path / "out").exists()


def test_study_reports_a_run_main_py_stopped_as_diverged(tmp_path: Path) -> None:
    """main.py exits with 3 on a NaN/inf loss: the study keeps going, marks the run, and never turns it
    into a number (nor retrains it on the next invocation)."""
    fake = _fake_python(
        tmp_path,
        "value = lambda flag: args[args.index(flag) + 1]\n"
        "writer = RaportWriter(value('--workspace') + '/raport.json')\n"
        "writer.log_parameters({'seed': int(value('--seed')), 'epochs': int(value('--epochs')), 'train_subset': 100,\n"
        "                       'val_subset': None, 'precise_bn': 20, 'conv': 'involution'})\n"
        "writer.log((0, 5), {'train.loss': float('nan'), 'train.total_ips': 10.0})\n"
        "writer.close()\n"
        "sys.exit(3)\n",
    )
    argv = ["--ops", "involution", "--seeds", "0", "--epochs", "1", "--train-subset", "100", "--logs",
            str(tmp_path / "logs"), "--python", str(fake), "--data", str(tmp_path)]
    args = study.parse(argv)
    study.run_all(args)
    workspace = study.run_dir(args.logs, "involution", 0, study.settings_tag(args))
    assert (workspace / study.DIVERGED_MARKER).is_file()
    assert study.run_state(workspace, study._wanted(args, "involution", 0)) == "done"  # not retrained
    result = study.load_run(workspace, "involution", 0)
    assert result.diverged and result.top1 != result.top1  # NaN
    profiles = {"involution": study.OpProfile("involution", 270_000, 30_000_000)}
    study.write_report([result], profiles, ["involution"], tmp_path / "out", "fm", "cmd", "1 epoch", "machine")
    text = (tmp_path / "out" / "fm.md").read_text()
    assert "| Involution | `involution` | diverged | 1 |" in text and "Involution seed 0" in text


def test_a_study_with_other_settings_keeps_the_finished_runs_and_the_results(tmp_path: Path) -> None:
    """The README's second study command after the first deleted the first's finished runs, and every study wrote
    over the committed docs/results files: each schedule has its own folder, results go beside the runs."""
    fake = _fake_python(
        tmp_path,
        "value = lambda flag: args[args.index(flag) + 1]\n"
        "writer = RaportWriter(value('--workspace') + '/raport.json')\n"
        "writer.log_parameters({'seed': int(value('--seed')), 'epochs': int(value('--epochs')),\n"
        "                       'train_subset': int(value('--train-subset')), 'val_subset': None, 'precise_bn': 0})\n"
        "writer.close()\n",
    )
    common = ["--ops", "static", "--seeds", "0", "--logs", str(tmp_path / "logs"), "--python", str(fake), "--data",
              str(tmp_path), "--dry-run"]
    first = study.parse([*common, "--epochs", "1", "--train-subset", "100"])
    second = study.parse([*common, "--epochs", "2", "--train-subset", "200"])
    assert study.settings_tag(first) == "e1-train100-testall" and study.settings_tag(second) == "e2-train200-testall"
    assert first.out == tmp_path / "logs" / "e1-train100-testall"  # not docs/results
    first.dry_run = second.dry_run = False
    study.run_all(first)
    study.run_all(second)
    for args in (first, second):
        raport = study.run_dir(args.logs, "static", 0, study.settings_tag(args)) / "raport.json"
        assert raport.is_file()
    assert study.parse([*common, "--out", str(tmp_path / "r")]).out == tmp_path / "r"


def test_a_run_of_a_changed_recipe_is_set_aside_not_deleted(tmp_path: Path) -> None:
    workspace = tmp_path / "static" / "seed0"
    workspace.mkdir(parents=True)
    (workspace / "raport.json").write_text("old")
    aside = study._set_aside(workspace)
    assert aside.name == "seed0.old-1" and (aside / "raport.json").read_text() == "old" and not workspace.exists()
    workspace.mkdir()
    assert study._set_aside(workspace).name == "seed0.old-2"


@pytest.mark.slow
def test_ctrl_c_lets_main_py_save_its_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C reached the study's subprocess.call, which killed main.py before its SIGINT checkpoint was written:
    the study now forwards one SIGINT, waits for the save and exits 130 (a rerun resumes: --resume auto)."""
    import signal
    import time

    data = Path("/usr/share/datasets/fashion-mnist")
    if not (data / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)")
    argv = [sys.executable, str(SCRIPTS / "fashion_mnist_study.py"), "--ops", "static", "--seeds", "0", "--epochs",
            "2", "--train-subset", "4000", "--val-subset", "200", "--print-freq", "1", "--no-latency",
            "--logs", str(tmp_path / "logs"), "--", "-b", "8", "--no-autotune", "-j", "0"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "Epoch 0 train [3/" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT: asking main.py to save its checkpoint" in out and "Traceback" not in out
    assert "main.py: SIGINT received at epoch 0" in out, out[-3000:]
    workspace = tmp_path / "logs" / "e2-train4000-test200" / "static" / "seed0"
    assert (workspace / "checkpoint.pth.tar").is_file()


def test_setup_env_says_it_is_still_installing(tmp_path: Path) -> None:
    """scripts/setup_env.sh was silent for 275 s after 'about a minute' on a loaded machine: a slow pip (a stand-in
    that takes 3 s) now gets a heartbeat line naming its log, and a failed one still ends the script with its output."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/usr/bin/env bash\nexit 0\n")
    (venv / "bin" / "pip").write_text("#!/usr/bin/env bash\nsleep 3\necho pip-output\nexit ${FAKE_PIP_STATUS:-0}\n")
    for name in ("python", "pip"):
        (venv / "bin" / name).chmod(0o755)
    env = dict(os.environ, VENV=str(venv), SETUP_HEARTBEAT_S="1")
    done = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    beats = [line for line in done.stdout.splitlines() if line.startswith("[setup] still installing (")]
    assert beats and f"pip's output: {venv}/pip-install.log" in beats[0]
    assert "up to five on a loaded one" in done.stdout
    (venv / ".requirements.sha").unlink()
    failed = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, env=dict(env, FAKE_PIP_STATUS="3"),
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "pip-output" in failed.stdout and "failed (exit 3" in failed.stderr
