"""Data order: deterministic, resumable, identical however a global batch is split."""

from __future__ import annotations

from posttrain.data.sampler import epoch_batches, micro_batch


def test_epoch_batches_are_a_seeded_permutation_without_the_incomplete_tail():
    batches = epoch_batches([1] * 10, global_batch=4, seed=3, epoch=0)
    assert [len(b) for b in batches] == [4, 4]
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 8 and set(flat) <= set(range(10))
    assert batches == epoch_batches([1] * 10, global_batch=4, seed=3, epoch=0)
    assert batches != epoch_batches([1] * 10, global_batch=4, seed=3, epoch=1)
    assert batches != epoch_batches([1] * 10, global_batch=4, seed=4, epoch=0)


def test_micro_batch_layout_accumulation_major_then_process():
    batch = list("abcdefgh")
    assert micro_batch(batch, accum_index=0, rank=0, world_size=2, size=2) == list("ab")
    assert micro_batch(batch, accum_index=0, rank=1, world_size=2, size=2) == list("cd")
    assert micro_batch(batch, accum_index=1, rank=0, world_size=2, size=2) == list("ef")
    assert micro_batch(batch, accum_index=1, rank=1, world_size=2, size=2) == list("gh")
    assert micro_batch(batch, accum_index=0, rank=0, world_size=1, size=8) == batch


def test_group_by_length_keeps_batches_of_similar_length():
    lengths = [n % 97 for n in range(0, 970, 7)]  # 139 examples of scattered lengths
    grouped = epoch_batches(lengths, global_batch=8, seed=0, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, global_batch=8, seed=0, epoch=0)

    def waste(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert waste(grouped) < waste(plain) / 3
    flat = [i for b in grouped for i in b]
    assert len(flat) == len(set(flat)) == 136  # 17 full batches, each example at most once
