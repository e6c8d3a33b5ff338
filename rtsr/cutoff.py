"""Where the input's real bandwidth ends: known from its rate, refined from its spectrum.

The refinement answers inputs whose content stops well below their Nyquist (an MP3 at 44.1 kHz
with a 16 kHz low-pass, a 22.05 kHz file with 6.5 kHz of band). AudioSR's rule (the bin under
which 98.5 % of the summed magnitude lies) lands *inside* the real band of most speech and music,
whose spectra fall with frequency, and would throw real input away. rtsr looks for a low-pass
*edge* instead: the highest frequency whose long-term level is within 60 dB of the peak, accepted
only where the level falls by 30 dB or more within 1 kHz above it (natural roll-off never does),
the band above it is empty, and it lies clearly below the declared band.

Streaming stability: the cutoff moves at most twice. It is lowered (or not) once, at the first
200 ms frame boundary after a second of active audio; a lowered cutoff is restored to the
declared band, for good, as soon as the long-term spectrum shows content above it again (keeping
more of the input is always safe). Decisions fall on fixed frame boundaries, so the offline path,
which runs the same schedule, gives the same cutoff for every frame as any stream.
"""

from __future__ import annotations

import numpy as np

from rtsr.features import SR, bin_freqs

UPDATE_EVERY = 40  # frames (200 ms)
DECIDE_AFTER = 200  # active frames (1 s) of evidence before the one decision
ACTIVE_POWER = 1e-6  # mean bin power of a frame that counts as signal
EDGE_DB = 30.0  # drop within 1 kHz above the edge
EMPTY_DB = 60.0  # everything above the edge at least this far below the peak


def bandwidth_hz(mean_mag: np.ndarray, drop_db: float = 60.0) -> float:
    """Highest frequency (upper bin edge) whose level is within drop_db of the peak above 50 Hz."""
    f = bin_freqs()
    level = 20 * np.log10(np.maximum(mean_mag, 1e-12))
    peak = level[f >= 50].max()
    above = np.nonzero(level >= peak - drop_db)[0]
    return float(min(f[above[-1]] + f[1], SR / 2))


def lowpass_edge_hz(mean_mag: np.ndarray, declared_hz: float) -> float | None:
    """The frequency of a steep low-pass edge with an empty band above it, or None."""
    f = bin_freqs()
    bw = bandwidth_hz(mean_mag)
    level = 20 * np.log10(np.maximum(mean_mag, 1e-12))
    below = level[(f >= bw - 600) & (f < bw)]
    above = level[(f > bw + 200) & (f <= bw + 1200)]
    rest = level[(f > bw + 500) & (f <= 0.95 * declared_hz)]
    if len(below) == 0 or len(above) == 0 or len(rest) == 0:
        return None
    steep = below.mean() - above.mean() >= EDGE_DB
    empty = rest.max() < level[f >= 50].max() - EMPTY_DB
    return bw if steep and empty else None


class CutoffTracker:
    """Per-frame cutoff (Hz) of one stream."""

    def __init__(self, declared_hz: float, fixed_hz: float | None = None):
        self.declared = min(float(declared_hz), SR / 2)
        self.current = min(float(fixed_hz), SR / 2) if fixed_hz else self.declared
        self.deciding = fixed_hz is None  # still allowed to move
        self.lowered = False
        self.frame = 0
        self.active = 0
        self.sum_mag: np.ndarray | float = 0.0

    def update(self, mag: np.ndarray) -> np.ndarray:
        """mag: (channels, frames, bins) magnitudes of the next frames -> (frames,) cutoffs."""
        out = np.empty(mag.shape[1], dtype=np.float32)
        for t in range(mag.shape[1]):
            out[t] = self.current
            if not self.deciding:
                continue
            frame = mag[:, t]
            if (frame ** 2).mean() > ACTIVE_POWER:
                self.sum_mag = self.sum_mag + frame.mean(axis=0)
                self.active += 1
            self.frame += 1
            if self.frame % UPDATE_EVERY == 0 and self.active >= DECIDE_AFTER:
                self._decide()
        return out

    def _decide(self) -> None:
        edge = lowpass_edge_hz(self.sum_mag / self.active, self.declared)
        if not self.lowered:
            if edge is not None and edge < 0.85 * self.declared:
                self.current, self.lowered = edge, True
            else:
                self.deciding = False
        elif edge is None or edge > 1.05 * self.current:
            self.current, self.deciding = self.declared, False
