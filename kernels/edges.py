"""The band-edge search's scan (rtsr.cutoff): the first candidate position above which the
long-term spectrum stays quiet.

Judging every candidate at once (a median window and a row of bands each, as numpy matrices) made
the decision the dearest step of a live stream's first seconds; scanning up, a candidate is dropped
at its first band too many and the scan stops at the first hit, so most (position, band) pairs are
never looked at. The same edges: tested against the matrices' result on random spectra.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def first_quiet(level: np.ndarray, top: int, cand: np.ndarray, below_n: int, empty_db: float, ceiling: float,
                steep_at: np.ndarray, steep_db: float, quiet_from: np.ndarray, near_n: int,
                loud_share: float) -> int:
    """The index k of the first candidate position c = cand[k] whose bands level[quiet_from[k]:top]
    sit under quiet = min(median(level[c - below_n:c]) - empty_db, ceiling) but for at most
    loud_share of them (counted against at least one band) and of their first near_n, and, where
    steep_at[k] >= 0, whose median falls steep_db by level[steep_at[k]]; -1 if none."""
    window = np.empty(below_n)
    for k in range(len(cand)):
        below = _median(level[cand[k] - below_n:cand[k]], window)
        if steep_at[k] >= 0 and below - level[steep_at[k]] < steep_db:
            continue
        quiet = min(below - empty_db, ceiling)
        bands = max(top - quiet_from[k], 1)
        loud = near = 0
        for j in range(max(quiet_from[k], 0), top):  # stops at the first band too many
            if level[j] > quiet:
                loud += 1
                near += j < quiet_from[k] + near_n
                if loud / bands > loud_share or near > loud_share * near_n:
                    break
        else:
            return k
    return -1


@numba.njit(cache=True, nogil=True)
def _median(x: np.ndarray, scratch: np.ndarray) -> float:
    """np.median of x (the same value: the middle one, or the mean of the two middle ones), by an
    insertion sort in `scratch` (len(x)): a window of a dozen bands, without numba's allocation."""
    n = len(x)
    for i in range(n):
        v, j = x[i], i
        while j > 0 and scratch[j - 1] > v:
            scratch[j] = scratch[j - 1]
            j -= 1
        scratch[j] = v
    return scratch[n // 2] if n % 2 else (scratch[n // 2 - 1] + scratch[n // 2]) / 2
