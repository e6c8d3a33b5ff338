"""Overlap-add of synthesis frames: the engine's crossfade between consecutive model outputs.

sqrt-Hann synthesis windows on the analysis windows' 50 % overlap sum to exactly one, so
consecutive frames crossfade without level ripple; this loop is the hot spot of that stage.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def overlap_add(frames: np.ndarray, window: np.ndarray, acc: np.ndarray, offset: int, hop: int) -> None:
    """acc[b, offset + k*hop + j] += frames[b, k, j] * window[j], in place."""
    n_b, n_k, n = frames.shape
    for b in range(n_b):
        for k in range(n_k):
            start = offset + k * hop
            for j in range(n):
                acc[b, start + j] += frames[b, k, j] * window[j]


def overlap_add_ref(frames: np.ndarray, window: np.ndarray, acc: np.ndarray, offset: int, hop: int) -> None:
    """Plain numpy version of `overlap_add` (the tests' reference)."""
    for k in range(frames.shape[1]):
        start = offset + k * hop
        acc[:, start:start + frames.shape[2]] += frames[:, k] * window
