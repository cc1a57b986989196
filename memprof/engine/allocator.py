"""A model of PyTorch's CUDA caching allocator: replay allocations and frees, predict reserved bytes.

The rules follow ``c10/cuda/CUDACachingAllocator.cpp`` (function names below are that file's)
and the settings of ``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF``
(``c10/cuda/CUDAAllocatorConfig.cpp``), one stream:

* ``round_size``: every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``);
  with ``roundup_power2_divisions`` a request above 512 x divisions is rounded up to the next of
  ``divisions`` equal steps between two powers of two (``roundup_power2_next_division``); the
  divisions can differ per power-of-two interval from 1 MiB up (the ``[256:1,>:4]`` form).
* ``get_pool`` / ``get_allocation_size``: requests of at most 1 MiB (``kSmallSize``) come from
  the *small* pool, whose segments are 2 MiB (``kSmallBuffer``); larger ones from the *large*
  pool: below 10 MiB (``kMinLargeAlloc``) in 20 MiB segments (``kLargeBuffer``), from 10 MiB on
  in a segment of their own rounded up to 2 MiB (``kRoundLarge``).
* ``get_free_block``: the smallest free cached block of the pool that is large enough (ties by
  address); with ``max_split_size_mb``, a request below it never takes a block at or above it,
  and a request at or above it only takes a block less than 20 MiB larger.
* ``should_split``: the rest of a block is split off when it is worth keeping - small pool:
  >= 512 B; large pool: > 1 MiB and the request below ``max_split_size``.
* ``free_block`` / ``try_merge_blocks``: a freed block merges with free neighbours of its
  segment and goes back to its pool; segments are only returned to CUDA on an out-of-memory.
* ``malloc``: when a new segment does not fit the device (``limit_bytes``), the allocator first
  frees oversize cached blocks (``release_available_cached_blocks``, only with
  ``max_split_size_mb``), then every cached segment that is entirely free
  (``release_cached_blocks``), and retries (``alloc_block(..., isRetry=true)``); only then is
  it out of memory.
* ``expandable_segments:True`` (``ExpandableSegment``, ``try_allocate_expandable_block``,
  ``map_block``, ``unmap_block``): one segment per pool grows by mapping pages - 2 MiB in the
  small pool, 20 MiB in the large one - at the lowest address where the request fits; every
  remainder of at least 512 B is split off; the free block that borders unmapped space counts
  as large as it could grow when picking the best fit; on an out-of-memory, the whole pages of
  free blocks are unmapped, then the request retried.
* ``garbage_collection_threshold`` only acts together with
  ``torch.cuda.set_per_process_memory_fraction`` (``set_fraction`` in ``malloc``): recorded,
  no effect here. ``backend:cudaMallocAsync`` replaces this allocator by CUDA's own pool: no
  512-byte rounding, and reserved bytes that cannot be replayed (:attr:`AllocatorConf.replayable`).

``allocated`` (the sum of the rounded block sizes in use) corresponds to
``torch.cuda.memory_allocated``, ``reserved`` (the sum of segment sizes or mapped pages) to
``torch.cuda.memory_reserved``. Pure Python, no torch.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import UsageError

KiB = 1024
MiB = 1024 * 1024

MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to multiples of this
SMALL_SIZE = 1 * MiB  # kSmallSize: largest "small" allocation
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: segment size of the small pool (and its expandable page)
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: segment size for allocations between 1 and 10 MiB (and large page)
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here allocations get their own segment
ROUND_LARGE = 2 * MiB  # kRoundLarge: own segments are rounded up to this
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB, 2 MiB, ... 32 GiB and above
_ADDRESS_SPACE = 1 << 46  # an expandable segment reserves address space for more than the GPU holds


# =========================================================================== settings
@dataclass(frozen=True)
class AllocatorConf:
    """The caching allocator's settings (``PYTORCH_CUDA_ALLOC_CONF``), as far as they change memory."""

    source: str | None = None  # "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"; None: the defaults
    max_split_size: int | None = None  # bytes; None: no limit
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    expandable_segments: bool = False
    garbage_collection_threshold: float = 0.0
    backend: str = "native"  # "native" | "cudaMallocAsync"
    #: settings given that do not change device memory, or that memprof does not model (said in notes)
    unmodelled: tuple[str, ...] = ()

    @property
    def replayable(self) -> bool:
        """Whether reserved bytes can be predicted: not under ``backend:cudaMallocAsync`` (CUDA's own pool)."""
        return self.backend == "native"

    def describe(self) -> list[str]:
        """One line per setting that changes the prediction, and per one that is recorded only."""
        if self.source is None:
            return []
        out = []
        if self.expandable_segments:
            out.append("expandable_segments: segments grow in 2 MiB (small) / 20 MiB (large) pages, rests split off")
        if self.max_split_size is not None:
            out.append(f"max_split_size_mb:{self.max_split_size // MiB}: blocks from there on are never split")
        if any(self.roundup_power2_divisions):
            divisions = sorted(set(self.roundup_power2_divisions))
            out.append(f"roundup_power2_divisions {divisions}: requests rounded to power-of-two divisions")
        if self.garbage_collection_threshold:
            out.append(
                f"garbage_collection_threshold:{self.garbage_collection_threshold:g} acts only with "
                "torch.cuda.set_per_process_memory_fraction (not modelled)"
            )
        if not self.replayable:
            out.append(
                "backend:cudaMallocAsync: CUDA's own memory pool, no 512-byte rounding; its reserved and NVML "
                "figures cannot be replayed, so none is predicted"
            )
        out.extend(self.unmodelled)
        return out


_KNOWN_UNMODELLED = {
    "release_lock_on_cudamalloc": "no effect on memory",
    "pinned_use_cuda_host_register": "host (pinned) memory only",
    "pinned_num_register_threads": "host (pinned) memory only",
    "pinned_use_background_threads": "host (pinned) memory only",
    "pinned_reserve_segment_size_mb": "host (pinned) memory only",
    "graph_capture_record_stream_reuse": "CUDA graphs only",
    "per_process_memory_fraction": "not modelled: give the capacity instead",
    "roundup_bypass_threshold_mb": "not modelled (older PyTorch)",
}


def _tokens(text: str) -> list[str]:
    """CUDAAllocatorConfig::lexArgs: ',', ':', '[' and ']' are tokens of their own."""
    out, word = [], ""
    for ch in text:
        if ch in ",:[]":
            if word.strip():
                out.append(word.strip())
            out.append(ch)
            word = ""
        elif not ch.isspace():
            word += ch
    if word.strip():
        out.append(word.strip())
    return out


def _bad(var: str, text: str, why: str) -> UsageError:
    return UsageError(
        f"{var}={text!r}: {why} (PyTorch refuses it too)",
        "fix or unset the environment variable; see https://pytorch.org/docs/stable/notes/cuda.html",
    )


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_alloc_conf(text: str, var: str = "PYTORCH_CUDA_ALLOC_CONF") -> AllocatorConf:
    """The settings ``text`` asks for, parsed as ``CUDAAllocatorConfig::parseArgs`` does; what PyTorch
    would reject raises :class:`UsageError`."""
    tokens = _tokens(text)
    values: dict[str, object] = {}
    divisions = [0] * ROUNDUP_INTERVALS
    unmodelled: list[str] = []
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key == ",":
            i += 1
            continue
        if i + 2 >= len(tokens) or tokens[i + 1] != ":":
            raise _bad(var, text, f"expected key:value at {key!r}")
        i += 2
        if key == "roundup_power2_divisions" and tokens[i] == "[":
            i += 1
            first, last_index = True, 0
            while i < len(tokens) and tokens[i] != "]":
                if tokens[i] == ",":
                    i += 1
                    continue
                if i + 2 >= len(tokens) or tokens[i + 1] != ":":
                    raise _bad(var, text, "roundup_power2_divisions lists are [SIZE_MB:DIVISIONS,...,>:DIVISIONS]")
                size_text, value = tokens[i], int(tokens[i + 2])
                if value != 0 and not _is_power_of_two(value):
                    raise _bad(var, text, "roundup_power2_divisions must be powers of 2")
                if size_text == ">":
                    divisions[last_index:] = [value] * (ROUNDUP_INTERVALS - last_index)
                else:
                    size_mb = int(size_text)
                    if not _is_power_of_two(size_mb):
                        raise _bad(var, text, "roundup_power2_divisions sizes must be powers of 2 (MB)")
                    index = min(size_mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
                    if first:
                        divisions[:index] = [value] * index
                        first = False
                    divisions[index] = value
                    last_index = index
                i += 3
            i += 1
            values[key] = tuple(divisions)
            continue
        value_text = tokens[i]
        i += 1
        if key == "max_split_size_mb":
            mb = int(value_text)
            if mb <= LARGE_BUFFER // MiB:
                raise _bad(var, text, f"max_split_size_mb too small, must be > {LARGE_BUFFER // MiB}")
            values[key] = mb * MiB
        elif key == "garbage_collection_threshold":
            threshold = float(value_text)
            if not 0.0 < threshold < 1.0:
                raise _bad(var, text, "garbage_collection_threshold must be between 0 and 1")
            values[key] = threshold
        elif key == "roundup_power2_divisions":
            value = int(value_text)
            if not _is_power_of_two(value):
                raise _bad(var, text, "roundup_power2_divisions must be a power of 2")
            values[key] = (value,) * ROUNDUP_INTERVALS
        elif key == "expandable_segments":
            if value_text not in ("True", "False"):
                raise _bad(var, text, "expandable_segments is True or False")
            values[key] = value_text == "True"
        elif key == "backend":
            if value_text not in ("native", "cudaMallocAsync"):
                raise _bad(var, text, "backend is native or cudaMallocAsync")
            values[key] = value_text
        elif key in _KNOWN_UNMODELLED:
            unmodelled.append(f"{key}:{value_text} ({_KNOWN_UNMODELLED[key]})")
        else:
            raise _bad(var, text, f"unrecognized option {key!r}")
    return AllocatorConf(
        source=f"{var}={text}",
        max_split_size=values.get("max_split_size_mb"),  # type: ignore[arg-type]
        roundup_power2_divisions=values.get("roundup_power2_divisions", (0,) * ROUNDUP_INTERVALS),  # type: ignore[arg-type]
        expandable_segments=bool(values.get("expandable_segments", False)),
        garbage_collection_threshold=float(values.get("garbage_collection_threshold", 0.0)),  # type: ignore[arg-type]
        backend=str(values.get("backend", "native")),
        unmodelled=tuple(unmodelled),
    )


def conf_from_env(env: Mapping[str, str] | None = None, torch_version: tuple[int, int] | None = None) -> AllocatorConf:
    """The settings a PyTorch process would read: ``PYTORCH_ALLOC_CONF`` (torch >= 2.8), else
    ``PYTORCH_CUDA_ALLOC_CONF``; the defaults when neither is set."""
    env = os.environ if env is None else env
    modern = torch_version is None or torch_version >= (2, 8)
    for var in (("PYTORCH_ALLOC_CONF",) if modern else ()) + ("PYTORCH_CUDA_ALLOC_CONF",):
        text = env.get(var)
        if text is not None and text.strip():
            return parse_alloc_conf(text.strip(), var)
    return AllocatorConf()


def conf_from_source(source: str | None) -> AllocatorConf:
    """The settings back from :attr:`AllocatorConf.source` (``"VAR=text"``); the defaults for None."""
    if not source:
        return AllocatorConf()
    var, _, text = source.partition("=")
    return parse_alloc_conf(text, var)


# =========================================================================== sizes
def roundup_power2_next_division(size: int, divisions: int) -> int:
    """The next of ``divisions`` equal steps between the powers of two around ``size``."""
    if size <= 4 or divisions <= 1:
        return size
    if _is_power_of_two(size):
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def _divisions(size: int, conf: AllocatorConf) -> int:
    index = max(0, (size.bit_length() - 1) - 20)  # interval 0: below 2 MiB
    return conf.roundup_power2_divisions[min(index, ROUNDUP_INTERVALS - 1)]


def round_size(nbytes: int, conf: AllocatorConf | None = None) -> int:
    """Size of the block a request of ``nbytes`` gets (``round_size``): a multiple of 512, at least 512,
    or the next power-of-two division with ``roundup_power2_divisions``."""
    if conf is not None and not conf.replayable:
        return nbytes  # cudaMallocAsync: no rounding
    if nbytes < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    if conf is not None:
        divisions = _divisions(nbytes, conf)
        if divisions > 1 and nbytes > MIN_BLOCK_SIZE * divisions:
            return roundup_power2_next_division(nbytes, divisions)
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


def should_split(block_size: int, rounded: int, small: bool, conf: AllocatorConf | None = None) -> bool:
    remaining = block_size - rounded
    if small or (conf is not None and conf.expandable_segments):
        return remaining >= MIN_BLOCK_SIZE
    max_split = conf.max_split_size if conf is not None and conf.max_split_size is not None else None
    return (max_split is None or rounded < max_split) and remaining > SMALL_SIZE


# =========================================================================== the model
class _Block:
    __slots__ = ("segment", "addr", "size", "allocated", "prev", "next", "small", "mapped")

    def __init__(self, segment: int, addr: int, size: int, small: bool, mapped: bool = True):
        self.segment = segment
        self.addr = addr
        self.size = size
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.small = small
        self.mapped = mapped

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


@dataclass(frozen=True)
class AllocatorStats:
    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    segments: int
    mallocs: int
    retries: int = 0
    ooms: int = 0


@dataclass
class _Pool:
    small: bool
    free: list = field(default_factory=list)  # (size, addr, block) of mapped free blocks
    expandable: _Block | None = None  # the first block of the pool's expandable segment


class CachingAllocatorModel:
    """Replays ``malloc(key, nbytes)`` / ``free(key)`` and tracks allocated and reserved bytes.

    ``limit_bytes``: what the allocator can get from CUDA (device memory the process may use, less
    the CUDA context); past it, cached segments are released and the request retried, and when
    that is not enough an out-of-memory is counted (:attr:`ooms`) and the replay goes on.
    """

    def __init__(self, conf: AllocatorConf | None = None, limit_bytes: int | None = None) -> None:
        self.conf = conf or AllocatorConf()
        self.limit_bytes = limit_bytes
        self._pools = {True: _Pool(True), False: _Pool(False)}
        self._live: dict[object, _Block] = {}
        self._next_addr = 0
        self._segments = 0
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.retries = 0  # cudaMalloc retried after releasing cached segments
        self.ooms = 0  # requests that did not fit even then
        self.first_oom_bytes: int | None = None  # reserved + request at the first out-of-memory

    # -- public ------------------------------------------------------------------------
    def malloc(self, key: object, nbytes: int) -> int:
        """Allocate ``nbytes`` for ``key``; returns the block size (0 for a 0-byte request)."""
        if nbytes <= 0:
            return 0
        if key in self._live:
            raise KeyError(f"{key!r} is already allocated")
        rounded = round_size(nbytes, self.conf)
        small = is_small(rounded)
        pool = self._pools[small]
        block = self._get_free_block(pool, rounded)
        if block is None:
            block = self._alloc_block(pool, rounded)
            if block is None:
                block = self._alloc_block(pool, rounded, retry=True) if self._release_cached(pool, rounded) else None
            if block is None:  # out of memory in a real run: count it, allocate anyway to go on
                self.ooms += 1
                if self.first_oom_bytes is None:
                    grows = -(-rounded // self._page(pool)) * self._page(pool)
                    self.first_oom_bytes = self.reserved_bytes + (
                        grows if self.conf.expandable_segments else segment_size(rounded)
                    )
                saved, self.limit_bytes = self.limit_bytes, None
                block = self._alloc_block(pool, rounded)
                self.limit_bytes = saved
                assert block is not None
        if should_split(block.size, rounded, small, self.conf):
            rest = _Block(block.segment, block.addr + rounded, block.size - rounded, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = rounded
            bisect.insort(pool.free, (rest.size, rest.addr, rest))
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
        pool = self._pools[block.small]
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour, pool)
        bisect.insort(pool.free, (block.size, block.addr, block))
        return size

    def largest_free_block(self) -> int:
        """The largest cached free block (CUDACachingAllocator ``cacheInfo``)."""
        return max((entry[0] for pool in self._pools.values() for entry in pool.free), default=0)

    def available_bytes(self) -> int | None:
        """What a caller asking ``cacheInfo`` for the largest usable block would be told: the device's free
        memory or the largest cached block, whichever is larger; None without a limit."""
        if self.limit_bytes is None:
            return None
        return max(self.limit_bytes - self.reserved_bytes, self.largest_free_block())

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
            self.retries,
            self.ooms,
        )

    # -- internals ----------------------------------------------------------------------
    def _try_merge(self, block: _Block, neighbour: _Block | None, pool: _Pool) -> None:
        if neighbour is None or neighbour.allocated or neighbour.mapped != block.mapped:
            return
        if neighbour.mapped:
            pool.free.remove((neighbour.size, neighbour.addr, neighbour))
        if neighbour is block.prev:
            block.addr = neighbour.addr
            block.prev = neighbour.prev
            if neighbour.prev is not None:
                neighbour.prev.next = block
            if pool.expandable is neighbour:
                pool.expandable = block
        else:
            block.next = neighbour.next
            if neighbour.next is not None:
                neighbour.next.prev = block
        block.size += neighbour.size

    def _grow(self, nbytes: int) -> None:
        self.reserved_bytes += nbytes
        if self.reserved_bytes > self.peak_reserved_bytes:
            self.peak_reserved_bytes = self.reserved_bytes

    def _fits(self, nbytes: int) -> bool:
        return self.limit_bytes is None or self.reserved_bytes + nbytes <= self.limit_bytes

    def _get_free_block(self, pool: _Pool, rounded: int) -> _Block | None:
        """``get_free_block``: best fit, with max_split_size's and expandable segments' rules."""
        free = pool.free
        i = bisect.bisect_left(free, (rounded, -1))
        if i >= len(free):
            return None
        if self.conf.expandable_segments:
            # the block next to unmapped space is as large as it could grow: taken last
            def grown(block: _Block) -> int:
                nxt = block.next
                return block.size + (nxt.size if nxt is not None and not nxt.mapped else 0)

            while i + 1 < len(free) and grown(free[i + 1][2]) < grown(free[i][2]):
                i += 1
        block = free[i][2]
        max_split = self.conf.max_split_size
        if max_split is not None:
            if rounded < max_split and block.size >= max_split:
                return None
            if rounded >= max_split and block.size >= rounded + LARGE_BUFFER:
                return None
        free.pop(i)
        return block

    def _alloc_block(self, pool: _Pool, rounded: int, retry: bool = False) -> _Block | None:
        """``alloc_block``: a new segment (cudaMalloc), or pages mapped into the expandable segment."""
        if retry:
            self.retries += 1
        if self.conf.expandable_segments:
            return self._alloc_expandable(pool, rounded)
        size = segment_size(rounded)
        if not self._fits(size):
            return None
        block = _Block(self._segments, self._next_addr, size, pool.small)
        self._segments += 1
        self._next_addr += size
        self._grow(size)
        return block

    def _release_cached(self, pool: _Pool, rounded: int) -> bool:
        """``release_available_cached_blocks`` (oversize blocks, with max_split_size) and, when that is
        not enough, ``release_cached_blocks`` (every entirely free segment, or free pages)."""
        max_split = self.conf.max_split_size
        if max_split is not None and not self.conf.expandable_segments:
            wanted = max(rounded, max_split)
            oversize = [entry for entry in pool.free if entry[0] >= max_split and not entry[2].is_split()]
            fitting = [entry for entry in oversize if entry[0] >= wanted]
            released = 0
            if fitting:
                self._release(pool, fitting[0])
                released = wanted
            else:
                for entry in sorted(oversize, reverse=True):
                    if released >= wanted:
                        break
                    self._release(pool, entry)
                    released += entry[0]
            if released >= wanted and self._fits(segment_size(rounded)):
                return True
        for p in self._pools.values():
            if self.conf.expandable_segments:
                for entry in list(p.free):
                    self._unmap(p, entry[2])
            else:
                for entry in [e for e in p.free if not e[2].is_split()]:
                    self._release(p, entry)
        return True

    def _release(self, pool: _Pool, entry: tuple) -> None:
        pool.free.remove(entry)
        self.reserved_bytes -= entry[0]

    # -- expandable segments --------------------------------------------------------------
    def _page(self, pool: _Pool) -> int:
        return SMALL_BUFFER if pool.small else LARGE_BUFFER

    def _alloc_expandable(self, pool: _Pool, rounded: int) -> _Block | None:
        """``try_allocate_expandable_block``: map pages at the lowest address where ``rounded`` fits."""
        if pool.expandable is None:
            base = self._next_addr
            self._next_addr += _ADDRESS_SPACE
            pool.expandable = _Block(self._segments, base, _ADDRESS_SPACE, pool.small, mapped=False)
            self._segments += 1
        found = self._find_expandable(pool, rounded)
        page = self._page(pool)
        candidate = found if found.mapped else self._map(pool, found, min(found.size, rounded), page)
        if candidate is None:
            return None
        while candidate.size < rounded:
            nxt = candidate.next
            assert nxt is not None and not nxt.mapped
            mapped = self._map(pool, nxt, min(rounded - candidate.size, nxt.size), page)
            if mapped is None:
                return None
            candidate = mapped
        pool.free.remove((candidate.size, candidate.addr, candidate))
        return candidate

    def _find_expandable(self, pool: _Pool, rounded: int) -> _Block:
        """``find_expandable_block``: the lowest unmapped range (with the free block before it) holding
        ``rounded``."""
        block: _Block | None = pool.expandable
        while block is not None:
            if not block.mapped:
                start = block.prev if block.prev is not None and not block.prev.allocated else block
                total = 0
                walk: _Block | None = start
                while walk is not None and not walk.allocated and total < rounded:
                    total += walk.size
                    walk = walk.next
                if total >= rounded:
                    return start
            block = block.next
        raise AssertionError("an expandable segment always has address space left")

    def _map(self, pool: _Pool, block: _Block, nbytes: int, page: int) -> _Block | None:
        """``map_block``: back ``nbytes`` (whole pages) at the start of the unmapped ``block``; merge."""
        size = min(block.size, -(-nbytes // page) * page)
        if not self._fits(size):
            return None
        if size < block.size:
            rest = _Block(block.segment, block.addr + size, block.size - size, pool.small, mapped=False)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
        block.mapped = True
        self._grow(size)
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour, pool)
        bisect.insort(pool.free, (block.size, block.addr, block))
        return block

    def _unmap(self, pool: _Pool, block: _Block) -> None:
        """``unmap_block``: give back the whole pages inside a free block; partial pages stay mapped."""
        page = self._page(pool)
        start = -(-block.addr // page) * page
        end = ((block.addr + block.size) // page) * page
        if end <= start:
            return
        pool.free.remove((block.size, block.addr, block))
        before, after = start - block.addr, block.addr + block.size - end
        if before:
            head = _Block(block.segment, block.addr, before, pool.small)
            head.prev, head.next = block.prev, block
            if block.prev is not None:
                block.prev.next = head
            block.prev = head
            if pool.expandable is block:
                pool.expandable = head
            bisect.insort(pool.free, (head.size, head.addr, head))
        if after:
            tail = _Block(block.segment, end, after, pool.small)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            bisect.insort(pool.free, (tail.size, tail.addr, tail))
        block.addr, block.size, block.mapped = start, end - start, False
        self.reserved_bytes -= block.size
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour, pool)


def replay(events: Iterable[tuple[object, int]], conf: AllocatorConf | None = None) -> AllocatorStats:
    """Replay ``(key, nbytes)`` events: ``nbytes > 0`` allocates, ``nbytes < 0`` (or 0 for a known key) frees."""
    model = CachingAllocatorModel(conf)
    for key, nbytes in events:
        if nbytes > 0:
            model.malloc(key, nbytes)
        else:
            model.free(key)
    return model.stats()
