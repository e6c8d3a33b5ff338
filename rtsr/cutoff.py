"""Where the input's real bandwidth ends: known from its rate, refined from its spectrum.

The refinement answers inputs whose content stops well below their Nyquist (an MP3 at 44.1 kHz
with a 16 kHz low-pass, a 22.05 kHz file with 6.5 kHz of band). AudioSR's rule (the bin under
which 98.5 % of the summed magnitude lies) lands *inside* the real band of most speech and music,
whose spectra fall with frequency, and would throw real input away; rtsr instead takes the highest
frequency whose long-term level is within 60 dB of the spectrum's peak, and only when that is
clearly below the declared band.

Streaming stability: the estimate is revised only on fixed frame boundaries during the first
second of active audio, needs a >5 % change to move, and is then frozen, so it cannot flap; the
offline path runs the same schedule, so both give the same cutoff for every frame.
"""

from __future__ import annotations

import numpy as np

from rtsr.features import SR, bin_freqs

UPDATE_EVERY = 40  # frames (200 ms)
LEARN_FRAMES = 200  # active frames (1 s) after which the estimate is frozen
ACTIVE_POWER = 1e-6  # mean bin power of a frame that counts as signal (about -60 dBFS)
MAX_CUTOFF = SR / 2


def bandwidth_hz(mean_mag: np.ndarray, drop_db: float = 60.0) -> float:
    """Highest frequency (upper bin edge) whose level is within drop_db of the peak above 50 Hz."""
    f = bin_freqs()
    level = 20 * np.log10(np.maximum(mean_mag, 1e-12))
    peak = level[f >= 50].max()
    above = np.nonzero(level >= peak - drop_db)[0]
    return float(min(f[above[-1]] + f[1], MAX_CUTOFF))


class CutoffTracker:
    """Per-frame cutoff (Hz) of one stream."""

    def __init__(self, declared_hz: float, fixed_hz: float | None = None):
        self.declared = min(float(declared_hz), MAX_CUTOFF)
        self.current = min(float(fixed_hz), MAX_CUTOFF) if fixed_hz else self.declared
        self.learning = fixed_hz is None
        self.frame = 0
        self.active = 0
        self.sum_mag = 0.0

    def update(self, mag: np.ndarray) -> np.ndarray:
        """mag: (channels, frames, bins) magnitudes of the next frames -> (frames,) cutoffs."""
        out = np.empty(mag.shape[1], dtype=np.float32)
        for t in range(mag.shape[1]):
            out[t] = self.current
            if not self.learning:
                continue
            frame = mag[:, t]
            if (frame ** 2).mean() > ACTIVE_POWER:
                self.sum_mag = self.sum_mag + frame.mean(axis=0)
                self.active += 1
            self.frame += 1
            if self.frame % UPDATE_EVERY == 0 and self.active:
                self._revise()
                self.learning = self.active < LEARN_FRAMES
        return out

    def _revise(self) -> None:
        bw = bandwidth_hz(self.sum_mag / self.active)
        new = bw if bw < 0.85 * self.declared else self.declared
        if abs(new - self.current) > 0.05 * self.current:
            self.current = new
