"""Pure-Python references for the cache-simulator ops (`remoe::simulate_cache`,
`remoe::lru_stack_distances`).

Written to be obviously right, not fast: plain dicts, a linear scan for every victim. The
compiled kernels must agree with these exactly. The access model is the one stated in
csrc/sim/cache_sim_cpu.cpp:

- A request (one token in one layer, or one (token, layer) for a global cache) needs its K
  distinct keys resident at once: all are looked up first (hits), then the misses are inserted,
  and no key of the request may be evicted to make room for another (they are pinned).
- Keys of a request are then stamped in column order, one tick each (the recency order).
- LRU: evict the least recently stamped key. LFU: the fewest uses since it became resident, ties
  -> least recently stamped. OPT (Belady): the key whose next use (flat position request * K +
  column) is farthest, never-used-again first, ties -> least recently stamped.
"""

from __future__ import annotations

from collections.abc import Sequence

POLICIES = ("lru", "lfu", "opt")
_NEVER = float("inf")


def _next_use(requests: Sequence[Sequence[int]], key: int, after: int) -> float:
    """Flat position of the first use of `key` in a request after request `after`."""
    for r in range(after + 1, len(requests)):
        if key in requests[r]:
            return r * len(requests[r]) + list(requests[r]).index(key)
    return _NEVER


def _eviction_order(policy: str, state: dict[str, int], requests: Sequence[Sequence[int]],
                    key: int, now: int) -> tuple:
    """The smallest tuple among the candidates is evicted."""
    if policy == "lru":
        return (state["stamp"],)
    if policy == "lfu":
        return (state["count"], state["stamp"])
    return (-_next_use(requests, key, now), state["stamp"])


def replay(requests: Sequence[Sequence[int]], capacity: int, policy: str) -> list[int]:
    """Hits of each request when replayed through one cache.

    Args:
        requests: R requests, each K distinct non-negative keys.
        capacity: slots C >= K.
        policy: "lru", "lfu" or "opt".

    Returns:
        hits [R]: keys of each request that were resident before the request.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    resident: dict[int, dict[str, int]] = {}  # key -> {"count": uses while resident, "stamp"}
    clock = 0
    hits = []
    for r, request in enumerate(requests):
        assert capacity >= len(request) and len(set(request)) == len(request)
        hits.append(sum(key in resident for key in request))
        for key in request:
            clock += 1
            if key in resident:
                resident[key]["count"] += 1
                resident[key]["stamp"] = clock
                continue
            if len(resident) == capacity:
                # The request's own keys are pinned: only the others may go.
                order = {k: _eviction_order(policy, state, requests, k, r)
                         for k, state in resident.items() if k not in request}
                del resident[min(order, key=order.__getitem__)]
            resident[key] = {"count": 1, "stamp": clock}
    return hits


def lru_stack_distances(requests: Sequence[Sequence[int]]) -> list[list[int]]:
    """LRU stack distance of every access, by brute force.

    Args:
        requests: R requests of K distinct keys.

    Returns:
        [R][K]: 1 + the number of distinct keys used after the key's previous use and before
        this request, or 0 for a first use.
    """
    flat = [key for request in requests for key in request]
    out = []
    start = 0
    for request in requests:
        row = []
        for key in request:
            previous = max((i for i in range(start) if flat[i] == key), default=None)
            row.append(0 if previous is None else 1 + len(set(flat[previous + 1 : start])))
        out.append(row)
        start += len(request)
    return out
