"""Low-resolution simulation for training (AudioSR's recipe, done in the frequency domain).

A zero-phase low-pass is a multiplication by |H(f)|^p on the FFT grid, and resampling down to a
rate just above twice the cutoff and back is (ideally) a brick-wall mask at the new Nyquist.
Precomputing a bank of such responses once lets a whole batch be degraded with one FFT on the
training device instead of filtering sample by sample on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import signal

from rtsr.features import SR

COMMON_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000)
FAMILIES = ("cheby1", "butter", "ellip", "bessel", "brickwall")


def _lowpass_sos(family: str, order: int, cutoff: float) -> np.ndarray:
    wn = min(cutoff / (SR / 2), 0.999)
    if family == "cheby1":
        return signal.cheby1(order, 0.1, wn, output="sos")
    if family == "ellip":
        return signal.ellip(order, 0.1, 60, wn, output="sos")
    if family == "bessel":
        return signal.bessel(order, wn, output="sos", norm="mag")
    return signal.butter(order, wn, output="sos")


def codec_response(f: np.ndarray, edge: float, rng: np.random.Generator) -> np.ndarray:
    """An encoder's low-pass (LAME, Vorbis, AAC): flat to the edge, a cliff over 1-5 % of it, then a
    floor 70-100 dB down (what is left of the band above: quantisation, the odd kept band)."""
    width = edge * rng.uniform(0.01, 0.05)
    floor = 10 ** (-rng.uniform(70, 100) / 20)
    ramp = np.clip((f - edge) / width, 0.0, 1.0)
    return np.maximum(0.5 + 0.5 * np.cos(np.pi * ramp), floor)


def resampler_response(f: np.ndarray, low_sr: float, rng: np.random.Generator) -> np.ndarray:
    """A polyphase resampler's anti-alias filter down to low_sr and back (applied twice): a
    Kaiser-windowed sinc with its cutoff at the lower Nyquist, as scipy's resample_poly or sox
    designs it, from gentle (short, beta 5) to steep (long, beta 10)."""
    taps = int(rng.integers(10, 40)) * 2 * round(SR / low_sr) + 1
    h = signal.firwin(taps, 0.5 * low_sr, window=("kaiser", rng.uniform(5.0, 10.0)), fs=SR)
    _, resp = signal.freqz(h, worN=f, fs=SR)
    return np.abs(resp) ** 2


def random_response(n_fft: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One random degradation as (|response| on the rfft grid of n_fft, the cutoff to declare).

    Besides filter families, the shapes the band-edge detector meets in users' files: encoders'
    cliffs at any edge up to 19.8 kHz (MP3s at 44.1 kHz, Vorbis at 48 kHz) and resamplers' sinc
    filters, each declared at their edge, as `rtsr.cutoff` reports it.
    """
    f = np.fft.rfftfreq(n_fft, 1.0 / SR)
    if rng.random() < 0.15:
        edge = rng.uniform(4000.0, 19800.0)
        return codec_response(f, edge, rng).astype(np.float32), float(edge * rng.uniform(0.98, 1.02))
    if rng.random() < 0.15:
        low_sr = float(rng.choice(COMMON_RATES)) if rng.random() < 0.5 else rng.uniform(6000.0, 40000.0)
        return resampler_response(f, low_sr, rng).astype(np.float32), float(low_sr / 2 * rng.uniform(0.97, 1.03))
    if rng.random() < 0.08:  # telephone band: 300-3400 Hz through an 8 kHz channel
        sos = signal.butter(4, [300, 3400], btype="band", fs=SR, output="sos")
        _, h = signal.sosfreqz(sos, worN=f, fs=SR)
        return (np.abs(h) * (f < 4000)).astype(np.float32), float(3400 * rng.uniform(1.0, 1.15))
    if rng.random() < 0.5:
        rate = float(rng.choice(COMMON_RATES))
        cutoff = rate / 2 * rng.uniform(0.9, 0.99)
    else:
        cutoff = rng.uniform(2000.0, 16000.0)
        rate = 2 * cutoff * rng.uniform(1.0, 1.1)
    family = FAMILIES[rng.integers(len(FAMILIES))]
    if family == "brickwall":
        resp = (f < cutoff).astype(np.float64)
    else:
        _, h = signal.sosfreqz(_lowpass_sos(family, int(rng.integers(2, 11)), cutoff), worN=f, fs=SR)
        resp = np.abs(h) ** rng.choice([1.0, 2.0])  # one pass, or forward-backward (filtfilt)
    if rng.random() < 0.5:
        resp = resp * (f < rate / 2)  # the resample down and back up
    declared = min(cutoff, rate / 2) * rng.uniform(0.97, 1.04)
    return resp.astype(np.float32), float(declared)


def high_response(n_fft: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """An edge at 12-19.8 kHz: an encoder's cliff (MP3 at 44.1 kHz, Vorbis at 48 kHz) or a
    resampler's filter down to 24-40 kHz; what users' 16 kHz-band files hold. Measured (run
    `high`, `--high-share 0.4`, 5,769 iterations from `basic` on a partial corpus): no gain on the
    16 kHz-band real-world cases (MP3 0.752 -> 0.763, Vorbis 0.702 -> 0.697), dev in-band 0.4655 ->
    0.4713; hence 0 by default."""
    f = np.fft.rfftfreq(n_fft, 1.0 / SR)
    if rng.random() < 0.7:
        edge = rng.uniform(12000.0, 19800.0)
        return codec_response(f, edge, rng).astype(np.float32), float(edge * rng.uniform(0.98, 1.02))
    low_sr = rng.uniform(24000.0, 40000.0)
    return resampler_response(f, low_sr, rng).astype(np.float32), float(low_sr / 2 * rng.uniform(0.97, 1.03))


def random_tilt(hr: torch.Tensor, max_db_per_octave: float, gen: torch.Generator | None = None,
                pivot_hz: float = 1000.0) -> torch.Tensor:
    """Tilt each item's spectrum by a random slope in [-max, max] dB per octave above pivot_hz.

    Why: the model misjudges a recording's overall high-band level (the corpus's average balance
    stands in for it); with the balance varied, the slope shows in the input's own upper octaves
    and the model has to follow it. Measured (run cpu3, `train.py --tilt 3`): no dev-set gain,
    hence off by default.
    """
    n = hr.shape[-1]
    f = torch.fft.rfftfreq(n, 1.0 / SR, device=hr.device)
    octaves = torch.log2(f.clamp_min(pivot_hz) / pivot_hz)
    slope = (torch.rand(hr.shape[0], 1, generator=gen) * 2 - 1).to(hr.device) * max_db_per_octave
    return torch.fft.irfft(torch.fft.rfft(hr.float()) * 10 ** (slope * octaves / 20), n=n)


class DegradationBank:
    """A fixed bank of random responses; degrade() applies random entries to a batch."""

    def __init__(self, n_fft: int, size: int = 2048, seed: int = 0, device: str = "cpu", high_share: float = 0.0):
        """high_share: this share of the entries are `high_response`s (edges at 12-19.8 kHz), on top
        of those `random_response` draws there itself."""
        rng = np.random.default_rng(seed)
        n_high = round(high_share * size)
        pairs = [random_response(n_fft, rng) for _ in range(size - n_high)]
        pairs = sorted(pairs + [high_response(n_fft, rng) for _ in range(n_high)], key=lambda p: p[1])
        self.n_fft = n_fft
        self.responses = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device, torch.float16)
        self.cutoffs = torch.tensor([p[1] for p in pairs], device=device)  # ascending

    def degrade(self, hr: torch.Tensor, gen: torch.Generator | None = None,
                max_cutoff: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hr: (B, n_fft) -> (low-resolution audio at 48 kHz, declared cutoff in Hz per item).

        max_cutoff (B,) draws each item's degradation among those declared at or under it: a
        target whose own band ends at 11 kHz can teach a 6 kHz cutoff, not a 14 kHz one (its
        "missing" band would be the codec's silence). The lowest entry stands in when none fits.
        """
        u = torch.rand(hr.shape[0], generator=gen).to(hr.device)
        if max_cutoff is None:
            count = torch.full_like(u, len(self.cutoffs))
        else:
            count = torch.searchsorted(self.cutoffs, max_cutoff.to(self.cutoffs), right=True).clamp_min(1)
        idx = (u * count).long().clamp_max(len(self.cutoffs) - 1)
        spec = torch.fft.rfft(hr.float(), n=self.n_fft) * self.responses[idx].float()
        return torch.fft.irfft(spec, n=self.n_fft), self.cutoffs[idx]
