"""Per-layer variance of the dynamic coefficients over validation images, and their histograms.

DCD (Li et al., ICLR 2021, Sec. 5.4, Fig. 6) checks that the dynamic channel fusion Phi(x) really depends on
the input: ``sigma_Phi = sum_ij sigma_ij / L^2`` with ``sigma_ij`` the variance of entry ``phi_ij(x)`` over
all validation images, normalised per layer by the variance of the layer's input feature map. This tool
computes that statistic for every dynamic layer and every coefficient it generates:

* PEDConv: gamma (C_out), phi (C_in/g), psi (k*k) of Eq. 1-2, post-sigmoid, rank-R components flattened;
  spatial PEDConv: the same with every output location of every image as a sample;
* DCD: Lambda (C_out) and Phi (L x L per block; joint/depthwise forms as generated);
* DY-Conv / CondConv: the kernel attention pi (K).

``sigma = mean over entries of Var_x(entry)``; ``input_var`` is the variance of all input activations of the
layer (over images, channels and positions); ``normalized_sigma = sigma / input_var`` (DCD Fig. 6). In eval
mode PEDConv's coefficients are the deterministic means (no sampling noise), as at inference. Usage::

    python -m image_classification.tools.coefficients /data/imagenet \\
        --checkpoint logs/r50_pedconv/model_best.pth.tar --images 5000 --out logs/coefficients

writes ``coefficients.csv`` (layer, operator, component, entries, images, mean, sigma, input_var,
normalized_sigma, min, max) and ``coefficients.png`` (normalised sigma across layers per component, and a
histogram of each component's values over the first ``--hist-images`` images, all layers pooled).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from image_classification.analysis.coefficients import CoefficientStats, collect_coefficients, stats_rows
from image_classification.analysis.common import (
    add_data_flags,
    check_data_flags,
    load_classifier,
    prepare_out,
    run_analysis,
    save_figure,
    validation_batches,
    write_csv,
)
from image_classification.argparsing import ArgumentParser, positive_int, run_program

PROG = "python -m image_classification.tools.coefficients"


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_data_flags(p, images_default=1000)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="classifier checkpoint with dynamic layers")
    p.add_argument("--hist-images", type=positive_int, default=256, help="images whose values enter the histograms")
    p.add_argument("--bins", type=positive_int, default=50)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_data_flags(parser, args)

    def body() -> int:
        out = prepare_out(args.out)
        loaded = load_classifier(args.checkpoint, args.arch, args.device)
        batches, _ = validation_batches(args, loaded)
        stats = collect_coefficients(loaded.model, batches, args.hist_images, args.device)
        rows = stats_rows(stats)
        write_csv(f"{out}/coefficients.csv", rows)
        _figure(stats, rows, args.bins, f"{loaded.arch} / {loaded.conv}", f"{out}/coefficients.png")
        print(f"wrote {out}/coefficients.png and {out}/coefficients.csv ({len(stats)} dynamic layers, "
              f"{rows[0]['images']} images)")
        return 0

    return run_analysis(PROG, body)


def _figure(stats: Dict[str, CoefficientStats], rows: List[Dict[str, object]], bins: int, title: str,
            path: str) -> None:
    import matplotlib.pyplot as plt

    components: List[str] = []
    for row in rows:
        if row["component"] not in components:
            components.append(str(row["component"]))
    fig = plt.figure(figsize=(max(8.0, 3.2 * len(components)), 7.0))
    grid = fig.add_gridspec(2, len(components))
    top = fig.add_subplot(grid[0, :])
    for comp in components:
        points: List[Tuple[int, float]] = [(int(r["index"]), float(r["normalized_sigma"]))  # type: ignore[call-overload, arg-type]  # the CSV rows are dicts of str -> object
                                           for r in rows if r["component"] == comp]
        top.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=comp)
    top.set_xlabel("dynamic layer (forward order)")
    top.set_ylabel("normalized variance sigma / Var(input)")
    top.set_yscale("log")
    top.set_title(f"Variance of the dynamic coefficients over images (DCD Fig. 6) - {title}", fontsize=9)
    top.legend(fontsize=8)
    for i, comp in enumerate(components):
        ax = fig.add_subplot(grid[1, i])
        values = [torch.cat(entry.samples[comp]) for entry in stats.values() if comp in entry.samples]
        if values:
            ax.hist(torch.cat(values).numpy(), bins=bins, color=f"C{i}")
        ax.set_title(f"{comp}: values, all layers", fontsize=9)
        ax.set_xlabel("coefficient value")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    run_program(main)
