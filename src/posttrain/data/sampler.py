"""Which examples go into which micro-batch, on which process, at which step.

The order is a pure function of (seed, epoch, lengths, global batch size), so a resumed
run replays exactly the batches an uninterrupted run would see, and the same global
batch split over 2 processes or over 4 accumulation steps holds the same examples.
"""

from __future__ import annotations

import torch

MEGABATCH = 50  # group_by_length sorts within windows of this many global batches (as HF Trainer does)


def epoch_batches(
    lengths: list[int], global_batch: int, seed: int, epoch: int, group_by_length: bool = False
) -> list[list[int]]:
    """Global batches of example indices for one epoch; the incomplete last batch is dropped.

    Every process and accumulation step of a step takes its slice of the same global
    batch (see ``micro_batch``), so dropping keeps all processes in lockstep.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = MEGABATCH * global_batch
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: -lengths[j])
        ]
    batches = [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    if group_by_length:  # sorted windows would otherwise run long-to-short; shuffle the batch order
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
    return batches


def micro_batch(batch: list[int], accum_index: int, rank: int, world_size: int, size: int) -> list[int]:
    """The slice of a global batch for one accumulation step on one process.

    Layout: accumulation step major, then process, then examples: with 2 processes and
    2 accumulation steps of 2, ``[a b c d e f g h]`` gives rank 0 ``ab`` then ``ef``.
    """
    start = (accum_index * world_size + rank) * size
    return batch[start : start + size]
