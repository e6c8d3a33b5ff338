"""The band detector's frames (rtsr.cutoff.LongTermSpectrum): windowed, and their powers counted.

numpy's version of the same arithmetic (stack, window, |X|^2, sum over channels, mean, compare,
add) cost a watched phone-band stream as much as the FFT it wraps; here two passes. Bit for bit
numpy's: the powers' mean over bins is numpy's pairwise sum (`_pairwise`), so a frame counted here
is a frame numpy would count (tested).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def windowed(buf: np.ndarray, n: int, hop: int, window: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Frames k < n of buf ((samples, channels), C-contiguous), from sample k * hop, times the
    window, written into out ((n, channels, len(window)) float32) and returned. A mono frame is
    one contiguous run of samples, which vectorises (RESULTS.md: the band detector's commits)."""
    size, channels = len(window), buf.shape[1]
    flat = buf.reshape(-1)
    for k in range(n):
        for c in range(channels):
            o = out[k, c]
            if channels == 1:
                x = flat[k * hop:k * hop + size]
                for i in range(size):
                    o[i] = x[i] * window[i]
            else:
                for i in range(size):
                    o[i] = flat[(k * hop + i) * channels + c] * window[i]
    return out


@numba.njit(cache=True, nogil=True)
def count_loud(spec: np.ndarray, threshold: np.float32, power: np.ndarray) -> int:
    """Each frame's power per bin (spec: (frames, channels, bins) complex, summed over channels);
    the frames whose mean power is over `threshold` are added to `power` (float64), in order.
    Returns how many were."""
    n, channels, bins = spec.shape
    p = np.empty(bins, np.float32)
    loud = 0
    for k in range(n):
        for b in range(bins):
            x = spec[k, 0, b]
            p[b] = x.real * x.real + x.imag * x.imag
            for c in range(1, channels):
                x = spec[k, c, b]
                p[b] += x.real * x.real + x.imag * x.imag
        if _pairwise(p, 0, bins) / np.float32(bins) > threshold:
            for b in range(bins):
                power[b] += p[b]
            loud += 1
    return loud


@numba.njit(cache=True, nogil=True)
def _pairwise(a: np.ndarray, lo: int, n: int) -> np.float32:
    """numpy's pairwise sum of a[lo:lo + n] (float32): a span over 128 is the sum of its halves
    (the first a multiple of 8 long), a shorter one of eight running sums. Walked with a stack of
    its own: numba's cached recursive functions can crash when loaded."""
    span_lo, span_n, stage = np.empty(64, np.int64), np.empty(64, np.int64), np.zeros(64, np.int64)
    sums = np.empty(64, np.float32)
    top, done = 0, 0
    span_lo[0], span_n[0] = lo, n
    while top >= 0:
        at, m = span_lo[top], span_n[top]
        half = m // 2 - (m // 2) % 8
        if m <= 128:
            sums[done] = _block_sum(a, at, m)
            done += 1
            top -= 1
        elif stage[top] < 2:  # its first half, then its second, onto the stack
            stage[top] += 1
            top += 1
            span_lo[top], span_n[top] = (at, half) if stage[top - 1] == 1 else (at + half, m - half)
            stage[top] = 0
        else:
            sums[done - 2] = sums[done - 2] + sums[done - 1]
            done -= 1
            top -= 1
    return sums[0]


@numba.njit(cache=True, nogil=True)
def _block_sum(a: np.ndarray, lo: int, n: int) -> np.float32:
    """numpy's sum of up to 128 float32: one by one under 8, else eight running sums."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r = a[lo:lo + 8].copy()
    i = 8
    while i < n - n % 8:
        for j in range(8):
            r[j] += a[lo + i + j]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for j in range(i, n):
        res += a[lo + j]
    return res
