"""Summary of a ``scripts/gpu_checks.sh`` run: one markdown table set and one JSON file from its outputs.

Usage::

    python -m image_classification.tools.gpu_report OUT_DIR      # writes OUT_DIR/summary.md and OUT_DIR/summary.json

Reads what the script leaves in ``OUT_DIR`` (any part may be missing when a stage failed or ran out of
time; the summary says so): ``stages.tsv`` (stage, exit status, seconds), ``pytest.log`` (the cuda-marked
tests), ``pytest_triton.log`` (the Triton test files compiled on the GPU), ``benchmark.json``
(``python -m image_classification.tools.benchmark --json``: per-layer ratios to nn.Conv2d),
``profiler_*.json`` (``python -m image_classification.tools.profiler --latency --json``: whole networks vs
static), ``triton/triton_pedconv_check.json`` (the kernel check) and ``loader.json``
(``python -m image_classification.tools.loader_benchmark --feed resnet18 --json``: the input pipelines and whether
they feed a training step as fast as synthetic data). The targets of issue 12
are checked where their figures exist: per layer, train step of the Triton path (or of ``path=auto``)
<= 1.3x nn.Conv2d; whole-network train throughput PEDConv / static >= 0.8 (ResNet-18/50) and >= 0.7
(MobileNetV2).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from image_classification.argparsing import ArgumentParser, run_program

__all__ = ["LAYER_TRAIN_TARGET", "THROUGHPUT_TARGETS", "collect", "format_markdown", "main"]

#: per-layer train step (fwd+bwd) of the fused path, ratio to nn.Conv2d (issue 12)
LAYER_TRAIN_TARGET = 1.3
#: whole-network train throughput PEDConv / static, by architecture prefix (issue 12)
THROUGHPUT_TARGETS = {"resnet18": 0.8, "resnet50": 0.8, "mobilenet_v2": 0.7}


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stages(out: Path) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    try:
        lines = (out / "stages.tsv").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].lstrip("-").isdigit():
            rows.append({"stage": parts[0], "rc": int(parts[1]), "seconds": float(parts[2])})
    return rows


def _pytest_summary(out: Path, name: str = "pytest.log") -> Optional[str]:
    try:
        lines = (out / name).read_text().splitlines()
    except OSError:
        return None
    pattern = re.compile(r"\d+ (passed|failed|skipped|error)")
    tail = [line.strip("= ") for line in lines if pattern.search(line)]
    return tail[-1] if tail else None


def _throughput_target(arch: str) -> Optional[float]:
    for prefix, target in THROUGHPUT_TARGETS.items():
        if arch.startswith(prefix):
            return target
    return None


def _path_counts(paths: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    counts: Dict[str, Counter] = {}
    for row in paths:
        counts.setdefault(row.get("mode", "?"), Counter())[row.get("path", "?")] += 1
    return {mode: dict(sorted(c.items())) for mode, c in sorted(counts.items())}


def collect(out: Path) -> Dict[str, Any]:
    """Everything the summary shows, as plain data (also written as summary.json)."""
    summary: Dict[str, Any] = {"stages": _stages(out), "pytest": _pytest_summary(out),
                               "pytest_triton": _pytest_summary(out, "pytest_triton.log"), "layers": [],
                               "networks": [], "triton_check": None}
    bench = _read_json(out / "benchmark.json")
    if isinstance(bench, dict):
        summary["benchmark_setup"] = {k: bench.get(k) for k in ("device", "device_name", "amp", "channels_last",
                                                                  "compile", "autotune", "torch", "complete")}
        for row in bench.get("rows", []):
            entry = dict(row)
            fused = row.get("op") in ("pedconv:path=triton", "pedconv")
            if fused and row.get("train_ratio") is not None:
                entry["target"] = LAYER_TRAIN_TARGET
                entry["met"] = row["train_ratio"] <= LAYER_TRAIN_TARGET
            summary["layers"].append(entry)
    for path in sorted(out.glob("profiler_*.json")):
        report = _read_json(path)
        if not isinstance(report, dict) or "latency" not in report:
            summary["networks"].append({"file": path.name, "error": "missing or incomplete"})
            continue
        lat = report["latency"]
        target = _throughput_target(report["arch"])
        summary["networks"].append({
            "file": path.name, "arch": report["arch"], "conv": report["conv"], "device": lat.get("device"),
            "amp": lat.get("amp"), "channels_last": lat.get("channels_last"), "train_batch": lat.get("train_batch"),
            "throughput_ratio": lat.get("throughput_ratio"), "train_img_s_dynamic": lat.get("train_img_s_dynamic"),
            "train_img_s_static": lat.get("train_img_s_static"), "train_ratio": lat.get("train_ratio"),
            "infer_ratio": lat.get("infer_ratio"), "peak_memory_ratio": lat.get("peak_memory_ratio"),
            "target": target, "met": (None if target is None or lat.get("throughput_ratio") is None
                                      else lat["throughput_ratio"] >= target),
            "paths": _path_counts(lat.get("paths", [])),
        })
    loader = _read_json(out / "loader.json")
    summary["input_pipeline"] = loader.get("markdown") if isinstance(loader, dict) else None
    check = _read_json(out / "triton" / "triton_pedconv_check.json")
    if isinstance(check, dict):
        exactness = check.get("exactness") or []
        summary["triton_check"] = {
            "device": (check.get("env") or {}).get("device"),
            "exactness_cases": len(exactness),
            "exactness_failed": [r.get("case") for r in exactness if not r.get("passed")],
            "layers_timed": len(check.get("layers") or []),
            "networks": check.get("networks"),
            "skipped": check.get("skipped"),
        }
    return summary


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_markdown(summary: Dict[str, Any]) -> str:
    lines = ["# GPU checks", ""]
    lines += ["## Stages", "", "| stage | exit | seconds |", "|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['rc']} | {s['seconds']:.0f} |")
    if not summary["stages"]:
        lines.append("| (no stages.tsv) | - | - |")
    lines += ["", f"cuda-marked tests: {summary['pytest'] or 'no pytest.log'}",
              f"Triton test files (compiled): {summary['pytest_triton'] or 'no pytest_triton.log'}", ""]
    setup = summary.get("benchmark_setup")
    lines += ["## Per layer (ratio to nn.Conv2d, same run)", ""]
    if setup:
        lines += [f"device {setup.get('device_name') or setup.get('device')}, amp {setup.get('amp')}, "
                  f"channels_last {setup.get('channels_last')}, torch {setup.get('torch')}; target for the fused path "
                  f"and path=auto: train <= {LAYER_TRAIN_TARGET}"
                  + ("" if setup.get("complete", True) else " (INCOMPLETE: the stage was cut short)"), ""]
    lines += ["| shape | batch | operator | fwd x | train x | mem x | img/s | paths | target met | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["layers"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['op']} | {_fmt(r.get('fwd_ratio'))} | "
                     f"{_fmt(r.get('train_ratio'))} | {_fmt(r.get('mem_ratio'))} | "
                     f"{_fmt(r.get('train_img_s'), '.0f')} | "
                     f"{r.get('paths') or ''} | {_fmt(r.get('met'))} | {r.get('note') or ''} |")
    if not summary["layers"]:
        lines.append("| (no benchmark.json) | | | | | | | | | |")
    lines += ["", "## Whole networks (PEDConv vs static, same run)", "",
              "| arch | conv | amp | batch | throughput ratio | img/s (dyn / static) | train x | batch-1 infer x | "
              "peak mem x | target | met | paths (train) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in summary["networks"]:
        if "error" in n:
            lines.append(f"| {n['file']} | {n['error']} | | | | | | | | | | |")
            continue
        train_paths = ", ".join(f"{p} {c}" for p, c in n["paths"].get("train", {}).items())
        lines.append(f"| {n['arch']} | {n['conv']} | {n['amp']} | {n['train_batch']} | {_fmt(n['throughput_ratio'])} | "
                     f"{_fmt(n['train_img_s_dynamic'], '.0f')} / {_fmt(n['train_img_s_static'], '.0f')} | "
                     f"{_fmt(n['train_ratio'])} | {_fmt(n['infer_ratio'])} | {_fmt(n['peak_memory_ratio'])} | "
                     f">= {_fmt(n['target'])} | {_fmt(n['met'])} | {train_paths} |")
    if not summary["networks"]:
        lines.append("| (no profiler_*.json) | | | | | | | | | | | |")
    check = summary.get("triton_check")
    lines += ["", "## Triton kernel check", ""]
    if check:
        failed = ", ".join(check["exactness_failed"]) or "none"
        lines += [f"device {check['device']}: {check['exactness_cases']} exactness cases (failed: {failed}), "
                  f"{check['layers_timed']} layers timed; tables in triton/triton_pedconv_check.md", ""]
    else:
        lines += ["no triton/triton_pedconv_check.json", ""]
    lines += ["## Input pipeline (loader_benchmark)", ""]
    lines += [*(summary.get("input_pipeline") or ["no loader.json"]), ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m image_classification.tools.gpu_report",
                                     description="Summarise the outputs of scripts/gpu_checks.sh.")
    parser.add_argument("out", type=Path, help="the OUT_DIR scripts/gpu_checks.sh wrote")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a directory")
    summary = collect(args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = format_markdown(summary)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    run_program(main)
