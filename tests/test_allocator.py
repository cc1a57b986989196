"""The CUDA caching-allocator model: rounding, pools, segments, splitting, coalescing (hand-computed)."""

from __future__ import annotations

import pytest

from memprof.engine.allocator import CachingAllocatorModel, MiB, replay, round_size, segment_size, should_split


@pytest.mark.parametrize(
    "nbytes, rounded",
    [
        (1, 512),
        (4, 512),
        (511, 512),
        (512, 512),
        (513, 1024),
        (1000, 1024),
        (4096, 4096),
        (4097, 4608),
        (MiB, MiB),
        (MiB + 1, MiB + 512),
        (10 * MiB + 3, 10 * MiB + 512),
    ],
)
def test_round_size(nbytes, rounded):
    assert round_size(nbytes) == rounded


@pytest.mark.parametrize(
    "rounded, segment",
    [
        (512, 2 * MiB),
        (MiB, 2 * MiB),  # small pool: 2 MiB segments
        (MiB + 512, 20 * MiB),
        (5 * MiB, 20 * MiB),
        (10 * MiB - 512, 20 * MiB),  # 1-10 MiB: 20 MiB segments
        (10 * MiB, 10 * MiB),
        (10 * MiB + 512, 12 * MiB),
        (33 * MiB, 34 * MiB),  # >= 10 MiB: own, 2 MiB-rounded
    ],
)
def test_segment_size(rounded, segment):
    assert segment_size(rounded) == segment


def test_split_thresholds():
    assert should_split(2 * MiB, 2 * MiB - 512, small=True)  # 512 B left in the small pool: split
    assert not should_split(2 * MiB, 2 * MiB, small=True)
    assert should_split(20 * MiB, 19 * MiB - 512, small=False)  # 1 MiB + 512 left: split
    assert not should_split(20 * MiB, 19 * MiB, small=False)  # exactly 1 MiB left: kept whole


def test_small_pool_shares_one_segment():
    a = CachingAllocatorModel()
    for i in range(4096):  # 4096 x 512 B = 2 MiB: exactly one small segment
        assert a.malloc(i, 100) == 512
    assert a.reserved_bytes == 2 * MiB
    assert a.allocated_bytes == 2 * MiB
    a.malloc("one more", 1)
    assert a.reserved_bytes == 4 * MiB


def test_large_blocks_split_and_unsplittable_rest_is_allocated_whole():
    a = CachingAllocatorModel()
    for i in range(3):
        a.malloc(i, 6 * MiB)  # 20 MiB segment: 6 + 6 + 6, 2 MiB left after the third (> 1 MiB: split)
    assert a.reserved_bytes == 20 * MiB
    assert a.allocated_bytes == 18 * MiB
    # 1.5 MiB fits the 2 MiB rest; 0.5 MiB left is not > 1 MiB: the whole 2 MiB block is allocated
    assert a.malloc("x", 3 * MiB // 2) == 2 * MiB
    assert a.allocated_bytes == 20 * MiB and a.reserved_bytes == 20 * MiB
    a.malloc("y", 6 * MiB)
    assert a.reserved_bytes == 40 * MiB


def test_free_coalesces_and_best_fit_reuses():
    a = CachingAllocatorModel()
    for i in range(3):
        a.malloc(i, 5 * MiB)  # 5 + 5 + 5 (+ 5 free) in one 20 MiB segment
    a.free(0)
    a.free(1)  # merges with 0: a free 10 MiB block at the start
    a.malloc("big", 9 * MiB)  # best fit: the 5 MiB tail is too small, the merged 10 MiB block fits
    assert a.reserved_bytes == 20 * MiB
    assert a.allocated_bytes == 10 * MiB + 5 * MiB  # 10 MiB block (1 MiB rest not split) + block 2


def test_own_segment_for_large_and_pools_are_separate():
    a = CachingAllocatorModel()
    a.malloc("l", 10 * MiB + 1)
    assert a.reserved_bytes == 12 * MiB
    # 10 MiB + 512 used, 2 MiB - 512 left (> 1 MiB): split, but small requests never use the large pool
    a.malloc("s", 1000)
    assert a.reserved_bytes == 14 * MiB
    a.malloc("m", MiB + 512)  # the large pool's rest (2 MiB - 512) takes it, unsplit
    assert a.reserved_bytes == 14 * MiB


def test_replay_peaks():
    stats = replay([("a", 3 * MiB), ("b", 3 * MiB), ("a", -1), ("c", 30 * MiB), ("b", -1), ("z", 0)])
    assert stats.peak_allocated_bytes == 33 * MiB
    assert stats.peak_reserved_bytes == 50 * MiB
    assert stats.allocated_bytes == 30 * MiB
