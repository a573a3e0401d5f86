"""How much each dynamic layer's per-sample effective weight W(x) actually varies across inputs.

For every dynamic layer with a per-sample weight (PEDConv Eq. 2 / Appendix E, DCD Eq. 6-9, DY-Conv and
CondConv aggregation, DCD's classifier) over validation images x:

* ``relative_variation = sqrt(sum_ij Var_x W_ij(x)) / ||E_x W(x)||_F``: the RMS distance of a sample's weight
  from the mean weight, relative to the mean weight (0: a static layer; 0.1: a sample's weight is 10 % away
  from the average weight);
* ``norm_cv``: the coefficient of variation of ``||W(x)||_F`` over samples (how much of the variation is a mere
  rescaling of the whole kernel).

PEDConv's statistics are computed from its factors without ever forming the B x C_out x C_in x k x k weights:
``sum_b W(x_b) = W_base * sum_b c_b`` and ``sum_b W(x_b)^2 = W_base^2 * sum_b c_b^2`` with ``c_b`` the rank-R
CP tensor (multiplicative; the additive form likewise), both weight-sized sums of outer products. Other
operators use their ``dynamic_weight(x)`` a few samples at a time. Usage::

    python -m image_classification.tools.weight_variation /data/imagenet \\
        --checkpoint logs/r50_pedconv/model_best.pth.tar --images 2000 --out logs/weights

writes ``weights.csv`` (layer, operator, weight shape, images and both statistics) and ``weights.png``
(the statistics across layers).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

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
from image_classification.analysis.weights import collect_weight_variation
from image_classification.argparsing import ArgumentParser, run_program

PROG = "python -m image_classification.tools.weight_variation"


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_data_flags(p, images_default=500)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="classifier checkpoint with dynamic layers")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_data_flags(parser, args)

    def body() -> int:
        out = prepare_out(args.out)
        loaded = load_classifier(args.checkpoint, args.arch, args.device)
        batches, _ = validation_batches(args, loaded)
        moments = collect_weight_variation(loaded.model, batches, args.device)
        rows = []
        for index, (layer, entry) in enumerate(moments.items()):
            rows.append({"index": index, "layer": layer, "operator": entry.operator,
                         "shape": "x".join(str(s) for s in entry.shape), "images": entry.count,
                         **entry.statistics()})
        write_csv(f"{out}/weights.csv", rows)
        _figure(rows, f"{loaded.arch} / {loaded.conv}", f"{out}/weights.png")
        print(f"wrote {out}/weights.png and {out}/weights.csv ({len(rows)} dynamic layers, {rows[0]['images']} images)")
        return 0

    return run_analysis(PROG, body)


def _figure(rows: List[Dict[str, object]], title: str, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    x = [int(r["index"]) for r in rows]  # type: ignore[call-overload]  # the CSV rows are dicts of str -> object
    for ax, key, label in zip(axes, ("relative_variation", "norm_cv"),
                              ("RMS ||W(x) - E W|| / ||E W||", "CV of ||W(x)|| over inputs")):
        ax.plot(x, [float(r[key]) for r in rows], marker="o", ms=3)  # type: ignore[arg-type]  # the CSV rows are dicts of str -> object
        ax.set_xlabel("dynamic layer (forward order)")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"Per-sample effective weight variation across inputs - {title}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    run_program(main)
