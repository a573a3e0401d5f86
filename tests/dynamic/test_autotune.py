"""The path autotuner: cache keys and sources, the on/off switches, DDP broadcast, model preparation, and
PEDConv's use of it (every choice exact, the path report). Timings are faked where a choice is asserted."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from script_runner import forkserver_context

from image_classification.dynamic import autotune
from image_classification.dynamic.pedconv import PEDConv2d, format_path_report, has_auto_paths, path_report
from image_classification.dynamic.pedconv.paths import PATH_REGISTRY, candidate_paths, heuristic_path


@pytest.fixture
def tuning(monkeypatch):
    """Tuning on, an empty cache, and deterministic fake timings: the path named ``fastest`` wins."""
    autotune.CACHE.clear()
    autotune.set_autotune(True)
    autotune.set_budget(None)
    state = {"fastest": None, "calls": 0}

    def fake_measure(candidates, device, **_):
        state["calls"] += 1
        for fn in candidates.values():  # every candidate really runs once
            fn()
        names = list(candidates)
        winner = state["fastest"] if state["fastest"] in names else names[-1]
        # the static reference (PEDConv's yardstick) as fast as the winner: a plausible measurement
        return {name: (1.0 if name in (winner, "static") else 2.0 + i) for i, name in enumerate(names)}

    monkeypatch.setattr(autotune, "measure", fake_measure)
    yield state
    autotune.set_autotune(None)
    autotune.set_budget(None)
    autotune.CACHE.clear()


def test_switches(monkeypatch):
    autotune.set_autotune(None)
    monkeypatch.setenv(autotune.ENV_VAR, "0")
    assert not autotune.autotune_enabled()
    monkeypatch.setenv(autotune.ENV_VAR, "1")
    assert autotune.autotune_enabled()
    autotune.set_autotune(False)
    assert not autotune.autotune_enabled()
    autotune.set_autotune(None)


def test_choose_caches_and_falls_back(tuning):
    built = []

    def candidates():
        built.append(1)
        return {"a": lambda: None, "b": lambda: None}

    tuning["fastest"] = "a"
    assert autotune.choose(("k", 1), candidates, torch.device("cpu"), "b") == ("a", "tuned")
    assert autotune.choose(("k", 1), candidates, torch.device("cpu"), "b") == ("a", "tuned")
    assert len(built) == 1 and tuning["calls"] == 1
    autotune.set_autotune(False)
    assert autotune.choose(("k", 2), candidates, torch.device("cpu"), "b") == ("b", "heuristic")
    assert autotune.choose(("k", 1), candidates, torch.device("cpu"), "b") == ("a", "tuned")  # cached stays
    autotune.set_autotune(True)
    assert autotune.choose(("k", 3), lambda: {"one": lambda: None}, torch.device("cpu"), "b") == ("one", "only")
    assert autotune.choose(("k", 4), lambda: {}, torch.device("cpu"), "b") == ("b", "heuristic")


def test_cache_state_round_trip(tuning):
    tuning["fastest"] = "a"
    autotune.choose(("k",), lambda: {"a": lambda: None, "b": lambda: None}, torch.device("cpu"), "b")
    state = autotune.CACHE.state_dict()
    autotune.CACHE.clear()
    autotune.CACHE.load_state_dict(state, source="broadcast")
    entry = autotune.CACHE.get(("k",))
    assert entry.winner == "a" and entry.source == "broadcast" and set(entry.times_ms) == {"a", "b"}
    assert autotune.broadcast_cache() == 0  # no process group: nothing to do


def test_measure_returns_min_per_candidate_and_drops_slow_ones():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        torch.randn(256, 256) @ torch.randn(256, 256)

    times = autotune.measure({"fast": fast, "slow": slow}, torch.device("cpu"), rounds=3, max_rounds=6, budget_s=10.0)
    assert set(times) == {"fast", "slow"} and all(v >= 0 for v in times.values())
    assert calls["fast"] == 1 + 6  # warm-up + every round
    assert 1 + 3 <= calls["slow"] <= 1 + 6


def randomized(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "generator" in name:
                p.normal_(0.0, 0.3)
    return module


@pytest.mark.parametrize("grad", [False, True])
def test_every_candidate_choice_gives_the_same_result(tuning, grad):
    """Whatever the autotuner picks, forward and gradients equal path=reference."""
    torch.manual_seed(0)
    layer = randomized(PEDConv2d(8, 12, 3, padding=1, groups=2, sampling="none", bias=False)).train()
    x = torch.randn(3, 8, 6, 6, requires_grad=True)
    layer.path = "reference"
    expected = layer(x)
    ref_grads = torch.autograd.grad(expected.square().sum(), [x, *layer.parameters()], allow_unused=True)
    layer.path = "auto"
    names = candidate_paths(layer, tuple(x.shape), grad)
    assert len(names) >= 3 and "reference" not in names
    for name in names:
        autotune.CACHE.clear()
        tuning["fastest"] = name
        with torch.set_grad_enabled(grad):
            out = layer(x)
        entry = layer.logged_paths()[(tuple(x.shape), grad)]
        assert (entry["path"], entry["source"], entry["times_ms"][name]) == (name, "tuned", 1.0)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        if grad:
            grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()], allow_unused=True)
            for g, r in zip(grads, ref_grads):
                if r is not None:
                    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_training_candidates_are_lean_and_inference_adds_the_rest():
    layer = PEDConv2d(16, 16, 3, padding=1)
    train = candidate_paths(layer, (4, 16, 8, 8), True)
    infer = candidate_paths(layer, (4, 16, 8, 8), False)
    assert all(PATH_REGISTRY[p].lean for p in train)
    assert set(train) < set(infer) and {"unfold", "factored"} <= set(infer)
    additive = PEDConv2d(16, 16, 3, padding=1, reparam="additive")
    assert set(candidate_paths(additive, (4, 16, 16, 16), True)) == {"materialize", "fold"}


def test_path_report_and_sources(tuning):
    torch.manual_seed(1)
    model = nn.Sequential(PEDConv2d(4, 8, 3, padding=1), nn.ReLU(), PEDConv2d(8, 8, 1, path="fold"))
    assert has_auto_paths(model)
    tuning["fastest"] = "patch_gemm"
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 4, 5, 5))
    rows = path_report(model)
    assert [(r["layer"], r["input"], r["mode"], r["path"], r["source"]) for r in rows] == [
        ("0", "2x4x5x5", "eval", "patch_gemm", "tuned"), ("2", "2x8x5x5", "eval", "fold", "explicit")]
    text = format_path_report(rows)
    assert "*patch_gemm 1.00" in text and "explicit" in text
    autotune.set_autotune(False)
    with torch.no_grad():
        model(torch.randn(1, 4, 5, 5))
    row = [r for r in path_report(model) if r["input"] == "1x4x5x5"][0]
    assert row["source"] == "heuristic" and row["path"] == heuristic_path(model[0], (1, 4, 5, 5), False)
    assert format_path_report([]) == "no PEDConv layer has run yet"
    assert not has_auto_paths(nn.Sequential(PEDConv2d(4, 8, 3, path="fold")))


def test_copies_are_separate_layers():
    layer = PEDConv2d(4, 8, 3, padding=1)
    clone = copy.deepcopy(layer)
    assert clone._token != layer._token and clone.logged_paths() == {}
    clone(torch.randn(1, 4, 5, 5))
    assert layer.logged_paths() == {} and len(clone.logged_paths()) == 1


def test_prepare_model_tunes_train_and_eval_keys_without_side_effects(tuning):
    torch.manual_seed(2)
    model = nn.Sequential(PEDConv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), PEDConv2d(8, 8, 3, padding=1))
    model.train()
    stats = copy.deepcopy(model[1].state_dict())
    rng = torch.get_rng_state()
    autotune.prepare_model(model, train_shape=(4, 4, 6, 6), eval_shape=(2, 4, 6, 6))
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, stats[key]), key
    seen = {(r["layer"], r["input"], r["mode"]) for r in path_report(model)}
    assert seen == {("0", "4x4x6x6", "train"), ("0", "2x4x6x6", "eval"), ("3", "4x8x6x6", "train"),
                    ("3", "2x8x6x6", "eval")}
    assert len(autotune.CACHE) == 4
    calls = tuning["calls"]
    model(torch.randn(4, 4, 6, 6, requires_grad=True)).sum().backward()  # a real step reuses the cache
    assert tuning["calls"] == calls
    autotune.set_autotune(False)
    autotune.CACHE.clear()
    autotune.prepare_model(model, train_shape=(4, 4, 6, 6))
    assert len(autotune.CACHE) == 0  # tuning off: nothing to prepare


def _two_paths():
    return {"a": lambda: None, "b": lambda: None}


def test_budget_leaves_later_keys_to_the_heuristic(tuning, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock[0])
    real = autotune.measure

    def slow_measure(candidates, device, **kw):  # each timing "takes" 3 s of the budget
        clock[0] += 3.0
        return real(candidates, device, **kw)

    monkeypatch.setattr(autotune, "measure", slow_measure)
    tuning["fastest"] = "a"
    autotune.set_budget(5.0)
    cpu = torch.device("cpu")
    assert autotune.choose(("k", 1), _two_paths, cpu, "b") == ("a", "tuned")
    assert autotune.choose(("k", 2), _two_paths, cpu, "b") == ("a", "tuned")  # 3 s spent < 5 s
    assert autotune.tuning_seconds() == 6.0
    assert autotune.choose(("k", 3), _two_paths, cpu, "b") == ("b", "budget")  # spent: the heuristic
    assert autotune.choose(("k", 3), _two_paths, cpu, "b") == ("b", "budget")  # recorded (DDP ranks agree)
    assert tuning["calls"] == 2


def test_disk_cache_round_trip_is_per_machine_and_skips_fallbacks(tuning, tmp_path, monkeypatch, capsys):
    cpu = torch.device("cpu")
    tuning["fastest"] = "a"
    key = ("pedconv", 4, 8, (3, 3), (4, 4, 6, 6), "float32", True)
    autotune.choose(key, _two_paths, cpu, "b")
    autotune.set_budget(0.0)
    autotune.choose(("spent",), _two_paths, cpu, "b")
    path = tmp_path / "sub" / "paths.json"
    assert autotune.save_cache_file(path) == 1  # the budget fall-back is not written: a later run tunes it
    assert [p.name for p in path.parent.iterdir()] == ["paths.json"]  # no temporary left
    autotune.CACHE.clear()
    assert autotune.load_cache_file(path) == 1
    entry = autotune.CACHE.get(key)  # tuples come back as tuples: the same key
    assert entry.winner == "a" and entry.source == "disk" and set(entry.times_ms) == {"a", "b"}
    assert autotune.choose(key, _two_paths, cpu, "b") == ("a", "disk")
    # merged with what the file holds; another machine's file is ignored
    autotune.CACHE.clear()
    tuning["fastest"] = "b"
    autotune.set_budget(None)
    autotune.choose(("other",), _two_paths, cpu, "a")
    assert autotune.save_cache_file(path) == 2
    monkeypatch.setattr(autotune, "fingerprint", lambda device=None: "another-machine")
    autotune.CACHE.clear()
    assert autotune.load_cache_file(path) == 0 and len(autotune.CACHE) == 0
    monkeypatch.undo()
    # a corrupt file is a note, never an error
    path.write_text("{not json")
    assert autotune.load_cache_file(path) == 0
    assert "ignoring the PEDConv path cache" in capsys.readouterr().err
    assert autotune.load_cache_file(tmp_path / "missing.json") == 0


def test_default_cache_file_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    assert autotune.default_cache_file().parent == tmp_path
    assert autotune.default_cache_file().name == f"paths-{autotune.fingerprint()}.json"
    monkeypatch.delenv(autotune.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.default_cache_file().parent == tmp_path / "xdg" / "pedconv"


def test_prepare_model_says_what_it_did(tuning, capsys):
    model = nn.Sequential(PEDConv2d(4, 8, 3, padding=1), nn.ReLU(), PEDConv2d(8, 8, 3, padding=1))
    layers = [model[0], model[2]]
    out = model(torch.randn(2, 4, 6, 6))
    autotune.CACHE.clear()
    autotune.prepare_model(model, train_shape=(2, 4, 6, 6), eval_shape=(1, 4, 6, 6), layers=layers, show=True)
    err = capsys.readouterr().err
    assert "tuning PEDConv paths: 2 layers x 2 pass(es), no time budget ..." in err  # not a terminal: a line, no bar
    assert "PEDConv paths ready in" in err and "4 new layer shape(s) timed" in err
    autotune.prepare_model(model, train_shape=(2, 4, 6, 6), eval_shape=(1, 4, 6, 6), layers=layers, show=True)
    assert "0 new layer shape(s) timed" in capsys.readouterr().err
    assert model(torch.randn(2, 4, 6, 6)).shape == out.shape  # hooks removed, output intact
    assert all(not m._forward_hooks for m in layers)


def test_tuning_without_a_terminal_says_how_far_it_got(tuning, capsys, monkeypatch):
    """The quick start's ResNet-18 step printed 'tuning PEDConv paths: 16 layers x 2 pass(es)' and then nothing for
    140 s: without a terminal a line follows every PROGRESS_EVERY_S (here 0: after every layer forward)."""
    monkeypatch.setattr(autotune, "PROGRESS_EVERY_S", 0.0)
    model = nn.Sequential(PEDConv2d(4, 8, 3, padding=1), nn.ReLU(), PEDConv2d(8, 8, 3, padding=1))
    autotune.CACHE.clear()
    autotune.prepare_model(model, train_shape=(2, 4, 6, 6), eval_shape=(1, 4, 6, 6), layers=[model[0], model[2]],
                           show=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "layer forwards timed after" in line]
    assert [line.split(" layer")[0] for line in lines] == [f"tuning PEDConv paths: {i}/4" for i in range(1, 5)]


def _broadcast_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        autotune.CACHE.clear()
        autotune.CACHE.put(("shared",), autotune.TuneResult("fold" if rank == 0 else "patch_gemm", {"fold": 1.0}))
        if rank == 1:
            autotune.CACHE.put(("own",), autotune.TuneResult("materialize"))
        received = autotune.broadcast_cache()
        entry = autotune.CACHE.get(("shared",))
        queue.put((rank, received, entry.winner, entry.source, autotune.CACHE.get(("own",)) is not None))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_broadcast_cache_gives_every_rank_rank0s_choices():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = forkserver_context()  # like spawn (fresh processes), with torch already imported
    queue = ctx.Queue()
    procs = [ctx.Process(target=_broadcast_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, 1, "fold", "tuned", False), (1, 1, "fold", "broadcast", True)]


@pytest.mark.parametrize("stale", ["renamed_in_another_version", "triton"])
def test_a_cached_winner_that_cannot_run_here_is_timed_again(tuning, stale):
    """A cache file can name a path this version does not have (renamed) or one that cannot run here (a triton
    winner replayed on a CPU): the entry is dropped and the key tuned again, instead of a KeyError in every run."""
    from image_classification.dynamic.pedconv.selection import tuning_key

    torch.manual_seed(0)
    layer = PEDConv2d(4, 8, 3, padding=1).eval()
    x = torch.randn(2, 4, 5, 5)
    autotune.CACHE.load_state_dict({tuning_key(layer, x, False): {"winner": stale, "times_ms": {stale: 0.1}}},
                                   source="disk")
    tuning["fastest"] = "patch_gemm"
    with torch.no_grad():
        out = layer(x)
    assert torch.isfinite(out).all()
    row = path_report(nn.Sequential(layer))[0]
    assert (row["path"], row["source"]) == ("patch_gemm", "tuned")


@pytest.fixture
def real_timing():
    """Tuning on with the real measure(), an empty cache; restored afterwards."""
    autotune.CACHE.clear()
    autotune.set_autotune(True)
    yield
    autotune.set_autotune(None)
    autotune.set_budget(None)
    autotune.CACHE.clear()


def test_the_budget_bounds_a_measurement_and_a_cut_one_is_not_used(real_timing, tmp_path):
    """--autotune-budget 0.1 with candidates of 20 ms: the measurement (2 warm-ups + 3 rounds of 2 = 160 ms) stops at
    the budget, instead of finishing and overrunning it; the key takes the heuristic and nothing goes to disk."""
    import time

    def sleepy(ms: float):
        return lambda: time.sleep(ms / 1e3)

    autotune.set_budget(0.1)
    started = time.perf_counter()
    chosen = autotune.choose(("cut",), lambda: {"a": sleepy(20), "b": sleepy(20)}, torch.device("cpu"), "b")
    assert chosen == ("b", "budget")
    assert time.perf_counter() - started < 0.1 + 0.1  # one call past the deadline at most, plus slack
    with pytest.raises(autotune.MeasurementCut):
        autotune.measure({"a": sleepy(5)}, torch.device("cpu"), deadline=time.perf_counter() - 1)
    assert autotune.save_cache_file(tmp_path / "paths.json") == 0


def test_implausible_timings_are_taken_again_then_left_to_the_heuristic(real_timing, tmp_path, monkeypatch):
    """A winner far below the static conv it contains is measured once more; twice implausible, the key takes the
    heuristic (source noisy), which is never cached on disk. A plausible second measurement is used."""
    verdicts = [False, False, False, True]
    seen = []

    def plausible(times, winner):
        seen.append((dict(times), winner))
        return verdicts[len(seen) - 1]

    two = lambda: {"a": lambda: None, "static": lambda: None, "b": lambda: None}  # noqa: E731
    cpu = torch.device("cpu")
    assert autotune.choose(("noisy",), two, cpu, "b", references=("static",), plausible=plausible) == ("b", "noisy")
    assert len(seen) == 2 and autotune.save_cache_file(tmp_path / "paths.json") == 0
    chosen = autotune.choose(("again",), two, cpu, "b", references=("static",), plausible=plausible)
    assert chosen[1] == "tuned" and len(seen) == 4 and autotune.save_cache_file(tmp_path / "paths.json") == 1


def test_pedconv_calls_a_winner_far_below_the_static_conv_implausible():
    from image_classification.dynamic.pedconv.selection import PLAUSIBLE_FRACTION_OF_STATIC, plausible_timing

    assert plausible_timing({"factored": 1.0, "patch_gemm": 1.5, "static": 0.9}, "factored")
    assert not plausible_timing({"factored": 1.0, "patch_gemm": 1.5, "static": 20.0}, "factored")  # seen under load
    assert plausible_timing({"factored": PLAUSIBLE_FRACTION_OF_STATIC * 3.0, "static": 3.0}, "factored")
    assert plausible_timing({"factored": 1.0}, "factored")  # no reference timed: nothing to compare with


def test_a_layers_path_log_goes_with_it():
    """The path log lives in the selection module, keyed by the layer's token; it is dropped with the layer."""
    import gc

    from image_classification.dynamic.pedconv import selection

    layer = PEDConv2d(4, 8, 3, padding=1)
    layer(torch.randn(1, 4, 5, 5))
    token = layer._token
    assert len(selection.logged_paths(token)) == 1
    layer.forget_paths()
    assert selection.logged_paths(token) == {}
    del layer
    gc.collect()
    assert token not in selection._PATH_LOGS
