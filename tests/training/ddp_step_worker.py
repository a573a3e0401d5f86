"""One rank of tests/training/test_ddp_warnings.py: a DDP training step of a small network for every operator and
both memory formats, set up as main.py sets up a DDP run, with every warning an error."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: small_nets
from small_nets import SmallConvNet  # noqa: E402

from image_classification.dynamic import infomax_loss, list_operators  # noqa: E402
from image_classification.models import convert_model, to_channels_last  # noqa: E402
from image_classification.training.distributed import align_gradient_strides  # noqa: E402

SPECS = [op if op != "involution" else "involution:group_channels=4" for op in list_operators()]


def main() -> int:
    warnings.simplefilter("error")
    dist.init_process_group("gloo")
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for spec in SPECS:
            torch.manual_seed(0)
            model = convert_model(SmallConvNet(), spec, "all").train()
            if channels_last:
                to_channels_last(model)  # as build.py does for --memory-format nhwc
            align_gradient_strides(model)  # as build.py does before wrapping the model in DDP
            ddp = DistributedDataParallel(model)
            x = torch.randn(4, 3, 12, 12).contiguous(memory_format=fmt)
            loss = ddp(x).square().mean()
            term = infomax_loss(model)
            (loss + 0.1 * term if term is not None else loss).backward()
            print(f"rank {dist.get_rank()} {spec} {'nhwc' if channels_last else 'nchw'}: step without a warning",
                  flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
