"""Batches of token ids: right padding, labels, and optional packing of short examples.

Labels are -100 (ignored by the loss) outside the completion mask and on padding.
Padding is told apart by the attention mask (built from lengths), never by the pad id,
so a pad token equal to EOS cannot hide the real EOS from the loss.
"""

from __future__ import annotations

import bisect
from itertools import chain
from typing import Any

import datasets
import torch

IGNORE_INDEX = -100


def pad_batch(rows: dict[str, list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a column-wise micro-batch (as ``dataset[indices]`` returns it) to its longest row.

    Packed rows carry ``position_ids`` (restarting at 0 for each example); they get no
    attention mask, so the model builds a block-diagonal causal mask from the positions.
    Padding then forms one more block of its own, ignored by the loss.
    """
    ids, masks = rows["input_ids"], rows["completion_mask"]
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for i, (row, mask) in enumerate(zip(ids, masks, strict=True)):
        row_t = torch.tensor(row, dtype=torch.long)
        input_ids[i, : len(row)] = row_t
        labels[i, : len(row)] = torch.where(torch.tensor(mask, dtype=torch.bool), row_t, IGNORE_INDEX)
        attention[i, : len(row)] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if "position_ids" in rows:
        positions = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(rows["position_ids"]):
            positions[i, : len(row)] = torch.tensor(row)
            positions[i, len(row) :] = torch.arange(width - len(row))
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = attention
    batch["n_targets"] = (labels[:, 1:] != IGNORE_INDEX).sum()  # tokens the shifted loss counts
    batch["n_tokens"] = attention.sum()  # real (non-pad) tokens, for throughput
    return batch


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of example lengths into rows of ``capacity`` tokens.

    Longest examples first, each into the fullest row that still has room (as TRL's "bfd"
    packing); O(n log n) with a sorted list of free space. Returns lists of example indices,
    in the order placed. Deterministic: ties go to the lower index.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))  # the least free space that fits
        if slot == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            space, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (space - lengths[i], b))
    return bins


def pack_dataset(tokenized: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Concatenate short examples into rows of at most ``max_length`` tokens, with restarting positions."""
    bins = pack_bins(list(tokenized["length"]), max_length)

    def gather(members: list[int]) -> dict[str, Any]:
        rows = tokenized[members]
        return {
            "input_ids": list(chain.from_iterable(rows["input_ids"])),
            "completion_mask": list(chain.from_iterable(rows["completion_mask"])),
            "position_ids": [p for n in rows["length"] for p in range(n)],
            "length": sum(rows["length"]),
        }

    index = datasets.Dataset.from_dict({"members": bins})
    return index.map(gather, input_columns="members", remove_columns=["members"], desc="packing")
