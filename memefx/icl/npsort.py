"""numpy 1.23's ``argsort(kind="quicksort")``, tie order included, in pure Python.

The authors' prompt script sorts with single-key ``DataFrame.sort_values``, which pandas hands to
``numpy.argsort(kind="quicksort")``: an unstable introsort whose order among equal keys decided the member
order and the demonstration blocks of every published prompt. numpy changed that tie order after 1.23 (SIMD
sorts, chosen by CPU), so today's ``np.argsort`` cannot rebuild the published prompts; this module replays
the numpy 1.23 algorithm (``aquicksort_`` of ``npysort/quicksort.cpp`` with its ``aheapsort_`` fallback)
step by step. Keys must be totally ordered (ints, or floats without NaN: pandas removes NaN before sorting).
Pure Python: about 0.1 s per 100,000 keys here, enough for prompt tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SMALL_QUICKSORT = 15  # ranges of at most 16 items go to insertion sort (``pr - pl > 15`` partitions)


def _msb(n: int) -> int:
    """``npy_get_msb``: floor(log2(n)), 0 for n <= 1; the depth limit is twice this."""
    return max(n.bit_length() - 1, 0)


def _aheapsort(v: Sequence, tosort: list[int], start: int, n: int) -> None:
    """``aheapsort_`` on ``tosort[start:start + n]``: the fallback once quicksort exceeds its depth limit."""

    def at(k: int) -> int:  # the C code indexes the heap from 1
        return start + k - 1

    def sift(tmp: int, i: int, j: int, size: int) -> None:
        while j <= size:
            if j < size and v[tosort[at(j)]] < v[tosort[at(j + 1)]]:
                j += 1
            if v[tmp] < v[tosort[at(j)]]:
                tosort[at(i)] = tosort[at(j)]
                i, j = j, j + j
            else:
                break
        tosort[at(i)] = tmp

    for first in range(n >> 1, 0, -1):
        sift(tosort[at(first)], first, first << 1, n)
    while n > 1:
        tmp = tosort[at(n)]
        tosort[at(n)] = tosort[at(1)]
        n -= 1
        sift(tmp, 1, 2, n)


def _insertion(v: Sequence, tosort: list[int], pl: int, pr: int) -> None:
    """Insertion sort of ``tosort[pl:pr + 1]``: shifts only past strictly greater keys (stable)."""
    for pi in range(pl + 1, pr + 1):
        vi = tosort[pi]
        vp = v[vi]
        pj = pi
        while pj > pl and vp < v[tosort[pj - 1]]:
            tosort[pj] = tosort[pj - 1]
            pj -= 1
        tosort[pj] = vi


def _partition(v: Sequence, tosort: list[int], pl: int, pr: int) -> int:
    """One quicksort partition of ``tosort[pl:pr + 1]`` (median of three); returns the pivot's place."""
    t = tosort
    pm = pl + ((pr - pl) >> 1)
    if v[t[pm]] < v[t[pl]]:
        t[pm], t[pl] = t[pl], t[pm]
    if v[t[pr]] < v[t[pm]]:
        t[pr], t[pm] = t[pm], t[pr]
    if v[t[pm]] < v[t[pl]]:
        t[pm], t[pl] = t[pl], t[pm]
    vp = v[t[pm]]
    pi, pj = pl, pr - 1
    t[pm], t[pj] = t[pj], t[pm]
    while True:
        pi += 1
        while v[t[pi]] < vp:
            pi += 1
        pj -= 1
        while vp < v[t[pj]]:
            pj -= 1
        if pi >= pj:
            break
        t[pi], t[pj] = t[pj], t[pi]
    t[pi], t[pr - 1] = t[pr - 1], t[pi]
    return pi


def argsort_numpy123(values: Sequence | np.ndarray) -> np.ndarray:
    """``numpy.argsort(values, kind="quicksort")`` exactly as numpy 1.23 returns it, ties included.

    Args:
        values: 1-d keys (ints, or floats without NaN).

    Returns:
        int64 indices that sort ``values`` ascending.
    """
    v = values.tolist() if isinstance(values, np.ndarray) else list(values)
    num = len(v)
    tosort = list(range(num))
    pl, pr = 0, num - 1
    stack: list[tuple[int, int, int]] = []  # (pl, pr, depth) of the larger partitions left for later
    cdepth = _msb(num) * 2
    while True:
        if cdepth < 0:
            _aheapsort(v, tosort, pl, pr - pl + 1)
        else:
            while pr - pl > SMALL_QUICKSORT:
                pi = _partition(v, tosort, pl, pr)
                cdepth -= 1
                if pi - pl < pr - pi:  # keep the larger side for later, go on with the smaller
                    stack.append((pi + 1, pr, cdepth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, cdepth))
                    pl = pi + 1
            _insertion(v, tosort, pl, pr)
        if not stack:
            break
        pl, pr, cdepth = stack.pop()
    return np.asarray(tosort, dtype=np.int64)
