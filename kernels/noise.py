"""Counter-based Gaussian noise: the value for (seed, channel, frame, band) never depends on how
the signal was chunked, so the sampler's streaming and offline paths draw identical noise."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

_GOLDEN = uint64(0x9E3779B97F4A7C15)


@njit(cache=True, inline="always")
def _splitmix64(z):
    z = (z + _GOLDEN) & uint64(0xFFFFFFFFFFFFFFFF)
    z = ((z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)) & uint64(0xFFFFFFFFFFFFFFFF)
    z = ((z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)) & uint64(0xFFFFFFFFFFFFFFFF)
    return z ^ (z >> uint64(31))


@njit(cache=True, nogil=True)  # offline workers draw noise side by side
def _fill(out, seed, channel0, frame0):
    n_ch, n_bands, n_frames = out.shape
    for c in range(n_ch):
        for t in range(n_frames):
            key = _splitmix64(uint64(seed) * uint64(1000003) + uint64(channel0 + c))
            key = _splitmix64(key ^ uint64(frame0 + t))
            for b in range(n_bands):
                h1 = _splitmix64(key + uint64(2 * b))
                h2 = _splitmix64(key + uint64(2 * b + 1))
                u1 = ((h1 >> uint64(11)) + uint64(1)) * (1.0 / 9007199254740993.0)
                u2 = (h2 >> uint64(11)) * (1.0 / 9007199254740992.0)
                out[c, b, t] = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def frame_noise(seed: int, frame0: int, n_frames: int, n_bands: int, channels: int,
                channel0: int = 0) -> np.ndarray:
    """(channels, n_bands, n_frames) float32 standard normal noise for frames frame0.. onward."""
    out = np.empty((channels, n_bands, n_frames), dtype=np.float32)
    _fill(out, int(seed) & 0x7FFFFFFF, channel0, frame0)
    return out
