"""Magnitude of complex spectra, for the engine's analysis of many streams' frames at once.

torch's complex `abs` (a hypot per bin, not vectorised) cost ~3.6 us per stream per 20 ms round,
more than the FFT and the mel product together; sqrt(re^2 + im^2) in float32 here costs ~0.2.
The values agree to float32 rounding (hypot rounds once, this twice).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def magnitude(spec: np.ndarray) -> np.ndarray:
    """(frames, bins) complex64 -> (frames, bins) float32 |spec|."""
    ri = spec.view(np.float32)
    frames, bins = spec.shape
    out = np.empty((frames, bins), np.float32)
    for i in range(frames):
        for k in range(bins):
            re, im = ri[i, 2 * k], ri[i, 2 * k + 1]
            out[i, k] = np.sqrt(re * re + im * im)
    return out
