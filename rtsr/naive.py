"""A non-learned bandwidth extension, the yardstick a model must beat: shaped noise above the cutoff.

Per STFT frame, the input's power in its top octave (below the merge transition, where the
resampled input still has full level) is continued above the cutoff with a fixed slope (default
-12 dB/octave, roughly how speech and music spectra fall), filled with random-phase noise and
merged with the input by the engine's own STFT low-band merge and band-edge scan. Everything but
the generator is the engine's, so a model that scores no better than this adds nothing that a
one-line rule could not.

    y = extend(x, sr)          # (frames,) or (frames, channels) -> the same layout at 48 kHz
"""

from __future__ import annotations

import numpy as np
import torch

from rtsr.audio_spec import as_frames, check_rate
from rtsr.cutoff import band_of_48k, scan_band
from rtsr.features import HOP, N_FFT, bin_freqs, frame_count, istft, merge_weights, stft
from rtsr.resample import resample

SLOPE_DB_PER_OCTAVE = -12.0
TOP_OCTAVE = (0.5, 0.88)  # x cutoff: the band whose level is continued (under any band's fade: Band.merge_range)
HALF = N_FFT // 2


def analyse(x48: np.ndarray) -> np.ndarray:
    """(samples, channels) at 48 kHz -> the engine's STFT (channels, frames, bins).

    Frames are centred on multiples of HOP and cover every sample, as in `Stream`.
    """
    n = len(x48)
    frames = max(frame_count(n), 1)
    right = (frames - 1) * HOP + N_FFT - HALF - n
    padded = np.pad(x48.T, ((0, 0), (HALF, right)))
    return stft(torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))).numpy()


def detect_cutoff(x: np.ndarray, sr: int) -> float:
    """Where the engine puts the input's cutoff (Hz) when it upscales the whole signal."""
    return scan_band(as_frames(x, 1 if np.ndim(x) == 1 else np.shape(x)[1]), sr).hz


def shaped_noise(spec: np.ndarray, cutoffs: np.ndarray, slope_db: float, rng: np.random.Generator) -> np.ndarray:
    """Complex noise whose per-frame envelope continues the top-octave level at `slope_db` per octave."""
    f = bin_freqs()
    lo, hi = TOP_OCTAVE[0] * cutoffs[:, None], TOP_OCTAVE[1] * cutoffs[:, None]  # (frames, 1)
    band = (f >= lo) & (f < hi)  # (frames, bins)
    power = np.abs(spec) ** 2
    level = (power * band).sum(-1) / np.maximum(band.sum(-1), 1)  # (channels, frames) mean bin power
    f_ref = np.sqrt(lo * hi)  # the octave's level belongs to its geometric centre
    octaves = np.log2(np.maximum(f, f_ref) / f_ref)  # (frames, bins), 0 at and below f_ref
    env = np.sqrt(level[..., None] * 10.0 ** (slope_db * octaves / 10.0))
    # E|phase|^2 = 2, not 1: independent frames overlap-add incoherently and keep half the power a
    # consistent STFT of the same level would (their sqrt-Hann windows' squares sum to one, not two)
    phase = rng.standard_normal(spec.shape) + 1j * rng.standard_normal(spec.shape)
    return (env * phase).astype(np.complex64)


def extend(x: np.ndarray, sr: int, slope_db: float = SLOPE_DB_PER_OCTAVE, seed: int = 0) -> np.ndarray:
    """Upscale to 48 kHz with the input below its cutoff and shaped noise above; exact length, zero lag."""
    check_rate(sr)
    mono = np.ndim(x) == 1
    frames = as_frames(x, 1 if mono else np.shape(x)[1])
    x48 = resample(frames, sr)
    band = band_of_48k([x48], x48.shape[1], sr)  # = scan_band(frames, sr): the resampler chunks exactly
    if band.full:
        return x48[:, 0] if mono else x48
    spec = analyse(x48)
    cutoffs = np.full(spec.shape[1], band.hz, np.float32)
    w = merge_weights(*band.merge_range())  # (bins,): weight of the input
    noise = shaped_noise(spec, cutoffs, slope_db, np.random.default_rng(seed))
    y = istft(torch.from_numpy(w * spec + (1 - w) * noise)).numpy()[:, : len(x48)].T
    return y[:, 0] if mono else y
