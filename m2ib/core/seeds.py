"""The one seed rule: a pair's seed comes from the run seed and the pair's id, nothing else.

explain(), the pipeline and the metrics all derive per-pair seeds here, so a pair gets the same noise
(M2IB), masks (RISE) or random map whatever its batch, shard, position or entry point.
"""
from __future__ import annotations

import zlib

import torch


def pair_seed(sample_id: str, seed: int = 0) -> int:
    """A pair's seed from its sample id and the run seed (CRC-32 of "<seed>:<id>", 31 bits)."""
    return zlib.crc32(f"{int(seed)}:{sample_id}".encode()) & 0x7FFFFFFF


def generator(seed: int) -> torch.Generator:
    """A CPU generator for one pair: random draws happen on the CPU so they are the same on every
    device and in every batch."""
    return torch.Generator(device="cpu").manual_seed(int(seed))
