"""The CUDA caching-allocator model: rounding, pools, segments, splitting, coalescing (hand-computed)."""

from __future__ import annotations

import pytest

from memprof.engine.allocator import (
    AllocatorConf,
    CachingAllocatorModel,
    MiB,
    conf_from_env,
    parse_alloc_conf,
    replay,
    round_size,
    roundup_power2_next_division,
    segment_size,
    should_split,
)
from memprof.errors import UsageError


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


# --------------------------------------------------------------------------- PYTORCH_CUDA_ALLOC_CONF


def test_parse_alloc_conf_reads_what_pytorch_reads():
    text = "expandable_segments:True,max_split_size_mb:128,garbage_collection_threshold:0.6"
    conf = parse_alloc_conf(text)
    assert conf.expandable_segments and conf.max_split_size == 128 * MiB
    assert conf.garbage_collection_threshold == 0.6 and conf.replayable
    assert conf.source == "PYTORCH_CUDA_ALLOC_CONF=" + text
    assert parse_alloc_conf("roundup_power2_divisions:4").roundup_power2_divisions == (4,) * 16
    # the list form: MB sizes (powers of two) set the interval from 1 MiB up; the first fills those below it,
    # ">" everything from the last one given (CUDAAllocatorConfig::parseRoundUpPower2Divisions)
    listed = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,1024:4,>:8]").roundup_power2_divisions
    assert listed[:8] == (1,) * 8 and listed[8] == 1 and listed[9] == 2 and listed[10:] == (8,) * 6
    assert not parse_alloc_conf("backend:cudaMallocAsync").replayable
    assert parse_alloc_conf("release_lock_on_cudamalloc:True").unmodelled == (
        "release_lock_on_cudamalloc:True (no effect on memory)",
    )


@pytest.mark.parametrize(
    "text, why",
    [
        ("max_split_size_mb:20", "max_split_size_mb too small, must be > 20"),
        ("expandable_segment:True", "unrecognized option 'expandable_segment'"),
        ("roundup_power2_divisions:3", "power of 2"),
        ("garbage_collection_threshold:1.5", "between 0 and 1"),
        ("backend:cuda", "native or cudaMallocAsync"),
        ("expandable_segments", "expected key:value"),
    ],
)
def test_parse_alloc_conf_rejects_what_pytorch_rejects(text, why):
    with pytest.raises(UsageError, match=why):
        parse_alloc_conf(text)


def test_conf_from_env_prefers_the_new_name_on_new_torch():
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    assert conf_from_env(env, (2, 9)).expandable_segments
    old = conf_from_env(env, (2, 5))  # PYTORCH_ALLOC_CONF did not exist yet
    assert not old.expandable_segments and old.max_split_size == 64 * MiB
    assert conf_from_env({}, (2, 9)) == AllocatorConf()


def test_roundup_power2_divisions():
    # CUDACachingAllocator.cpp's own example: 1200 with 4 divisions between 1024 and 2048 -> 1280
    assert roundup_power2_next_division(1200, 4) == 1280
    assert roundup_power2_next_division(1024, 4) == 1024
    conf = parse_alloc_conf("roundup_power2_divisions:4")
    assert round_size(1200, conf) == 1536  # not above 512 x 4: plain 512 rounding
    assert round_size(3000, conf) == 3072  # 2048, 2560, 3072, 3584
    assert round_size(5 * MiB + 1, conf) == 6 * MiB  # 4, 5, 6, 7 MiB
    a = CachingAllocatorModel(conf)
    assert a.malloc("x", 5 * MiB + 1) == 6 * MiB  # also what memory_allocated counts


def test_max_split_size_keeps_oversize_blocks_whole():
    conf = parse_alloc_conf("max_split_size_mb:64")
    a = CachingAllocatorModel(conf)
    a.malloc("big", 100 * MiB)
    a.free("big")
    # a small request never takes a cached block at or above max_split_size: new 20 MiB segment
    a.malloc("small", 2 * MiB)
    assert a.reserved_bytes == 120 * MiB
    # a large one takes it only if it is less than 20 MiB bigger, and never splits it
    assert a.malloc("large", 90 * MiB) == 100 * MiB
    a.free("large")
    a.malloc("larger", 70 * MiB)  # 100 >= 70 + 20: not reused
    assert a.reserved_bytes == 120 * MiB + 70 * MiB
    plain = CachingAllocatorModel()
    plain.malloc("big", 100 * MiB)
    plain.free("big")
    assert plain.malloc("small", 2 * MiB) == 2 * MiB and plain.reserved_bytes == 100 * MiB  # split instead


def test_out_of_memory_retry_releases_cached_segments():
    a = CachingAllocatorModel(limit_bytes=100 * MiB)
    a.malloc("a", 60 * MiB)
    a.free("a")  # cached: 60 MiB reserved, nothing allocated
    a.malloc("b", 70 * MiB)  # 60 + 70 > 100: release the free segment, retry
    assert a.reserved_bytes == 70 * MiB and a.peak_reserved_bytes == 70 * MiB
    assert (a.retries, a.ooms) == (1, 0)
    a.malloc("c", 40 * MiB)  # 70 + 40 > 100 and nothing to release: out of memory
    assert a.ooms == 1 and a.first_oom_bytes == 110 * MiB
    unlimited = CachingAllocatorModel()
    unlimited.malloc("a", 60 * MiB)
    unlimited.free("a")
    unlimited.malloc("b", 70 * MiB)
    assert unlimited.peak_reserved_bytes == 130 * MiB  # without the capacity the replay overestimates


def test_split_segments_are_not_released():
    a = CachingAllocatorModel(limit_bytes=40 * MiB)
    a.malloc("x", 5 * MiB)  # in a 20 MiB segment
    a.malloc("y", 5 * MiB)
    a.free("x")  # the segment is split (y lives): cannot be returned
    a.malloc("z", 30 * MiB)  # 20 + 30 > 40
    assert a.ooms == 1


def test_expandable_segments_map_pages():
    conf = parse_alloc_conf("expandable_segments:True")
    a = CachingAllocatorModel(conf)
    a.malloc("a", 5 * MiB)  # one 20 MiB page of the large segment
    assert a.reserved_bytes == 20 * MiB
    a.malloc("b", 30 * MiB)  # fits the 15 MiB left plus one more page: 40 MiB mapped in all
    assert a.reserved_bytes == 40 * MiB and a.allocated_bytes == 35 * MiB
    a.malloc("s", 1000)  # small pool: its own 2 MiB page
    assert a.reserved_bytes == 42 * MiB
    a.malloc("c", 4 * MiB)  # the 5 MiB left at the end of the large segment: split (rest >= 512 B)
    assert a.reserved_bytes == 42 * MiB and a.allocated_bytes == 39 * MiB + 1024
    # the same requests without expandable segments: 20 + 30 (own segment, 2 MiB-rounded) + 2, c in a's segment
    b = CachingAllocatorModel()
    for key, n in (("a", 5 * MiB), ("b", 30 * MiB), ("s", 1000), ("c", 4 * MiB)):
        b.malloc(key, n)
    assert b.reserved_bytes == 52 * MiB


def test_expandable_segments_unmap_free_pages_on_out_of_memory():
    conf = parse_alloc_conf("expandable_segments:True")
    a = CachingAllocatorModel(conf, limit_bytes=100 * MiB)
    a.malloc("a", 60 * MiB)  # 3 pages
    a.malloc("b", 10 * MiB)  # 70 MiB used of 80 mapped
    a.free("a")  # [0, 60) free, [60, 70) b, [70, 80) free
    a.malloc("c", 90 * MiB)  # needs pages beyond 80: 80 + 80 > 100 -> unmap [0, 60) and retry
    assert a.ooms == 0 and a.retries == 1
    assert a.allocated_bytes == 100 * MiB
    assert a.reserved_bytes == 100 * MiB  # 20 (b's page) + 80 for c, mapped after [70, 80)


def test_cuda_malloc_async_does_not_round():
    conf = parse_alloc_conf("backend:cudaMallocAsync")
    assert round_size(1000, conf) == 1000
