"""Index helpers the backends share: exact validation shards, seeded training subsets, when to drop the
incomplete last batch."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["effective_drop_last", "shard_indices", "subset_indices"]


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Indices of an exact (unpadded) shard: ``rank, rank + world_size, ...`` below ``n``."""
    return range(rank, n, world_size)


def subset_indices(n: int, limit: Optional[int], seed: int) -> Optional[torch.Tensor]:
    """A seeded random subset of ``limit`` of ``n`` indices (sorted), or ``None`` when no subsetting."""
    if limit is None or limit >= n:
        return None
    generator = torch.Generator().manual_seed(int(seed) + 7919)
    return torch.randperm(n, generator=generator)[:limit].sort().values


def effective_drop_last(drop_last: bool, shard_size: int, batch_size: int) -> bool:
    """Drop the incomplete last batch only when the shard holds at least one full batch."""
    return bool(drop_last) and shard_size >= batch_size
