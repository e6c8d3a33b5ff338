"""What the engine takes and makes: input rates and channels, the 48 kHz output, the frame grid.

Torch-free on purpose: the wire protocol, the client and the broker check audio against these
without loading the engine (or torch).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SR = 48000  # every output is at this rate
N_FFT = 480  # 10 ms window: short, because the window length is part of the latency
HOP = 240  # 5 ms: 4 frames per 20 ms engine hop
MIN_SR, MAX_SR = 8000, 384000  # input rates accepted (telephone to studio)
MAX_CHANNELS = 64  # more is a transposed array, not audio (the engine keeps per-channel state)


def all_finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())


def as_frames(block: np.ndarray, channels: int, finite: Callable[[np.ndarray], bool] = all_finite) -> np.ndarray:
    """Validate one block of audio and return it as (frames, channels) float32. finite: the check
    for NaN/Inf (the engine passes a compiled one: numpy's costs a live stream's block ~1 us more)."""
    x = np.asarray(block)
    if x.dtype != np.float32:
        if x.dtype.kind not in "fiu":
            raise TypeError(f"audio must be numeric, got dtype {x.dtype}")
        if x.dtype.kind in "iu":  # integer PCM: scale to [-1, 1); unsigned (8-bit WAV's) is centred at half its range
            half = float(2 ** (8 * x.dtype.itemsize - 1))
            x = (x.astype(np.float64) - (half if x.dtype.kind == "u" else 0.0)) / half
        x = x.astype(np.float32)
    if x.ndim == 1 and channels == 1:
        x = x[:, None]
    if x.ndim == 2 and x.shape[1] > MAX_CHANNELS:
        raise ValueError(f"audio of shape {x.shape} would be {x.shape[1]} channels (at most {MAX_CHANNELS}): audio is "
                         f"(frames, channels); transposed? pass x.T")
    if x.ndim != 2 or x.shape[1] != channels:
        raise ValueError(f"expected (frames,{'' if channels == 1 else ' '}{channels}) audio, got shape {x.shape}")
    if not finite(x):
        raise ValueError(f"audio holds {int((~np.isfinite(x)).sum())} NaN/Inf samples")
    return x


def check_rate(sr: int | float) -> int:
    """The input rate as an int: 16000.0 and np.float32(16000) are 16000; 22050.5 is refused."""
    try:
        rate = int(sr)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"input rate must be a number of Hz, got {sr!r}") from None
    if rate != sr:
        raise ValueError(f"input rate must be a whole number of Hz, got {sr}")
    if not MIN_SR <= rate <= MAX_SR:
        raise ValueError(f"input rate {rate} Hz is outside {MIN_SR}..{MAX_SR}")
    return rate
