"""Time-frequency features shared by training and the streaming engine.

One STFT definition (sqrt-Hann, 50 % overlap, frames centred on multiples of the hop) serves
analysis, the vocoder's iSTFT head and the low-band merge. sqrt-Hann analysis times sqrt-Hann
synthesis sums to exactly one at 50 % overlap, so overlap-add needs no normalisation and
reconstructs perfectly: the low band of the output *is* the input.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

from rtsr.audio_spec import HOP, N_FFT, SR

N_BINS = N_FFT // 2 + 1
BIN_HZ = SR / N_FFT  # the spacing of the STFT's bins
N_MELS = 80
LOG_FLOOR = 1e-5  # magnitudes below this (about -125 dBFS for noise) are all "silence"
MEL_MEAN, MEL_STD = -5.0, 3.0  # fixed affine map of log-mel to roughly unit scale for the networks


@cache
def window() -> np.ndarray:
    """Periodic sqrt-Hann: its square overlap-adds to exactly 1 at hop N_FFT/2."""
    n = np.arange(N_FFT)
    return np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)).astype(np.float32)


def bin_freqs() -> np.ndarray:
    return np.arange(N_BINS) * BIN_HZ


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@cache
def mel_basis() -> np.ndarray:
    """(N_MELS, N_BINS) triangular filters, each row sums to 1 (a band's mean magnitude).

    With 100 Hz bins the lowest mel triangles would hold no bin; those take their nearest bin,
    so no band is ever empty.
    """
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(SR / 2), N_MELS + 2))
    f = bin_freqs()
    fb = np.zeros((N_MELS, N_BINS))
    for j in range(N_MELS):
        lo, mid, hi = edges[j], edges[j + 1], edges[j + 2]
        up = (f - lo) / max(mid - lo, 1e-9)
        down = (hi - f) / max(hi - mid, 1e-9)
        fb[j] = np.clip(np.minimum(up, down), 0.0, None)
        if fb[j].sum() == 0:
            fb[j, int(np.argmin(np.abs(f - mid)))] = 1.0
    return (fb / fb.sum(axis=1, keepdims=True)).astype(np.float32)


@cache
def mel_centers() -> np.ndarray:
    """Centre frequency (Hz) of each mel band: decides which bands lie below a cutoff."""
    return (mel_basis() @ bin_freqs()).astype(np.float32)


def frame_count(n_samples: int) -> int:
    """Frames needed to synthesise n output samples (frame t covers [tH - N/2, tH + N/2))."""
    return 0 if n_samples <= 0 else (n_samples - 1 + N_FFT // 2) // HOP + 1


def stft(x: torch.Tensor) -> torch.Tensor:
    """Complex STFT of an already padded signal (..., samples) -> (..., frames, bins).

    Frame k spans x[k*HOP : k*HOP + N_FFT]; callers pad N_FFT/2 zeros on the left so frame k is
    centred on output sample k*HOP. No implicit padding: streaming and offline call the same code.
    """
    frames = x.unfold(-1, N_FFT, HOP) * torch.from_numpy(window()).to(x.device, x.dtype)
    return torch.fft.rfft(frames, dim=-1)


def log_mel(spec: torch.Tensor) -> torch.Tensor:
    """Complex or magnitude spectrum (..., frames, bins) -> normalised log-mel (..., frames, mels)."""
    mag = spec.abs() if spec.is_complex() else spec
    mel = mag @ torch.from_numpy(mel_basis()).to(mag.device, mag.dtype).T
    return (torch.log(mel.clamp_min(LOG_FLOOR)) - MEL_MEAN) / MEL_STD


def cutoff_mask(cutoff_hz: torch.Tensor) -> torch.Tensor:
    """(B,) cutoff in Hz -> (B, N_MELS) 1 for mel bands whose centre is below the cutoff."""
    centers = torch.from_numpy(mel_centers()).to(cutoff_hz.device)
    return (centers[None, :] < cutoff_hz[:, None]).to(torch.float32)


def merge_weights(lo_hz: float, hi_hz: float, n_bins: int = N_BINS) -> np.ndarray:
    """Per-bin weight of the *input* in the low-band merge: 1 up to lo_hz, 0 from hi_hz on.

    The transition is a raised cosine, smooth (no brick-wall ringing); where it lies is the band
    edge's business (rtsr.cutoff.Band.merge_range). An infinite lo_hz keeps the whole input.
    """
    f = np.arange(n_bins) * (SR / 2) / (n_bins - 1)
    if math.isinf(lo_hz):
        return np.ones(n_bins, np.float32)
    w = np.clip((hi_hz - f) / max(hi_hz - lo_hz, 1e-9), 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(math.pi * w)).astype(np.float32)


def istft(spec: torch.Tensor) -> torch.Tensor:
    """(B, frames, bins) complex -> (B, samples) by overlap-add, inverse of `stft` on a signal
    padded with N_FFT/2 zeros on the left (that padding is removed again here)."""
    frames = torch.fft.irfft(spec, n=N_FFT, dim=-1) * torch.from_numpy(window()).to(spec.device)
    n = frames.shape[-2]
    out = torch.nn.functional.fold(frames.transpose(1, 2), output_size=(1, (n - 1) * HOP + N_FFT),
                                   kernel_size=(1, N_FFT), stride=(1, HOP))
    return out[:, 0, 0, N_FFT // 2:]
