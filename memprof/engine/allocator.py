"""A model of PyTorch's CUDA caching allocator: replay allocations and frees, predict reserved bytes.

The rules follow ``c10/cuda/CUDACachingAllocator.cpp`` with its default settings
(no ``max_split_size_mb``, no expandable segments, one stream):

* every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``), 0-byte
  requests take no block;
* requests of at most 1 MiB (``kSmallSize``) come from the *small* pool, whose segments
  are 2 MiB (``kSmallBuffer``); larger requests come from the *large* pool: below
  10 MiB (``kMinLargeAlloc``) in 20 MiB segments (``kLargeBuffer``), from 10 MiB on in a
  segment of their own rounded up to 2 MiB (``kRoundLarge``);
* a request takes the smallest free cached block of its pool that is large enough
  (best fit, ties by address), and splits it when the remainder is worth keeping:
  small pool if the remainder is >= 512 B, large pool if it is > 1 MiB;
* a freed block merges with free neighbours of the same segment and goes back to
  its pool; segments are never returned to CUDA (no ``empty_cache``, no OOM retry),
  so reserved only grows.

``allocated`` (the sum of the rounded block sizes in use) corresponds to
``torch.cuda.memory_allocated``, ``reserved`` (the sum of segment sizes) to
``torch.cuda.memory_reserved``. Pure Python, no torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * 1024

MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to multiples of this
SMALL_SIZE = 1 * MiB  # kSmallSize: largest "small" allocation
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: segment size of the small pool
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: segment size for allocations between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here allocations get their own segment
ROUND_LARGE = 2 * MiB  # kRoundLarge: own segments are rounded up to this


def round_size(nbytes: int) -> int:
    """Size of the block a request of ``nbytes`` gets (``round_size``): a multiple of 512, at least 512."""
    if nbytes < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    return MIN_BLOCK_SIZE * ((nbytes + MIN_BLOCK_SIZE - 1) // MIN_BLOCK_SIZE)


def is_small(rounded: int) -> bool:
    return rounded <= SMALL_SIZE


def segment_size(rounded: int) -> int:
    """Size of the segment cudaMalloc'ed when no cached block fits (``get_allocation_size``)."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((rounded + ROUND_LARGE - 1) // ROUND_LARGE)


def should_split(block_size: int, rounded: int, small: bool) -> bool:
    remaining = block_size - rounded
    if small:
        return remaining >= MIN_BLOCK_SIZE
    return remaining > SMALL_SIZE


class _Block:
    __slots__ = ("segment", "addr", "size", "allocated", "prev", "next", "small")

    def __init__(self, segment: int, addr: int, size: int, small: bool):
        self.segment = segment
        self.addr = addr
        self.size = size
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.small = small


@dataclass(frozen=True)
class AllocatorStats:
    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    segments: int
    mallocs: int


class CachingAllocatorModel:
    """Replays ``malloc(key, nbytes)`` / ``free(key)`` and tracks allocated and reserved bytes."""

    def __init__(self) -> None:
        # free blocks per pool, sorted by (size, addr)
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}
        self._live: dict[object, _Block] = {}
        self._next_addr = 0
        self._segments = 0
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0

    # -- public ------------------------------------------------------------------------
    def malloc(self, key: object, nbytes: int) -> int:
        """Allocate ``nbytes`` for ``key``; returns the rounded block size (0 for a 0-byte request)."""
        if nbytes <= 0:
            return 0
        if key in self._live:
            raise KeyError(f"{key!r} is already allocated")
        rounded = round_size(nbytes)
        small = is_small(rounded)
        pool = self._free[small]
        i = bisect.bisect_left(pool, (rounded, -1))
        if i < len(pool):
            _, _, block = pool.pop(i)
        else:
            size = segment_size(rounded)
            block = _Block(self._segments, self._next_addr, size, small)
            self._segments += 1
            self._next_addr += size
            self.reserved_bytes += size
            if self.reserved_bytes > self.peak_reserved_bytes:
                self.peak_reserved_bytes = self.reserved_bytes
        if should_split(block.size, rounded, small):
            rest = _Block(block.segment, block.addr + rounded, block.size - rounded, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = rounded
            bisect.insort(pool, (rest.size, rest.addr, rest))
        block.allocated = True
        self._live[key] = block
        self.allocated_bytes += block.size
        if self.allocated_bytes > self.peak_allocated_bytes:
            self.peak_allocated_bytes = self.allocated_bytes
        return block.size

    def free(self, key: object) -> int:
        """Free ``key``'s block (unknown keys, e.g. 0-byte allocations, are ignored); returns its size."""
        block = self._live.pop(key, None)
        if block is None:
            return 0
        size = block.size
        self.allocated_bytes -= size
        block.allocated = False
        pool = self._free[block.small]
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                pool.remove((neighbour.size, neighbour.addr, neighbour))
                if neighbour is block.prev:
                    block.addr = neighbour.addr
                    block.prev = neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                block.size += neighbour.size
        bisect.insort(pool, (block.size, block.addr, block))
        return size

    def reset_peak(self) -> None:
        self.peak_allocated_bytes = self.allocated_bytes
        self.peak_reserved_bytes = self.reserved_bytes

    def stats(self) -> AllocatorStats:
        return AllocatorStats(
            self.allocated_bytes,
            self.reserved_bytes,
            self.peak_allocated_bytes,
            self.peak_reserved_bytes,
            self._segments,
            self._segments,
        )


def replay(events: Iterable[tuple[object, int]]) -> AllocatorStats:
    """Replay ``(key, nbytes)`` events: ``nbytes > 0`` allocates, ``nbytes < 0`` (or 0 for a known key) frees."""
    model = CachingAllocatorModel()
    for key, nbytes in events:
        if nbytes > 0:
            model.malloc(key, nbytes)
        else:
            model.free(key)
    return model.stats()
