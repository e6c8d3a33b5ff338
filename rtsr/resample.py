"""Exact, zero-lag streaming resampler to the model rate.

Output sample m sits at time m / sr_out (no group delay), and a chunked stream yields bit-for-bit the
same samples as the whole signal: each output is emitted only once every input it touches has
arrived, and is then computed by the same kernel over the same taps in the same order.
"""

from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from math import ceil, gcd, pi
from typing import Literal

import numpy as np

from rtsr.kernels.polyphase import oldest_needed, polyphase_bank, polyphase_resample, ready_end

Quality = Literal["medium", "high", "very_high"]

# quality -> (cutoff as a fraction of the lower Nyquist, nominal stopband attenuation in dB). The
# transition band is centred on the cutoff and ends at the lower Nyquist, so nothing at or above it
# images or aliases; the passband (ripple <= 0.002 dB) reaches 1 - 2 * (1 - rolloff) of that Nyquist,
# e.g. 0.9 for "high". Cost per output grows as 1 / (1 - rolloff).
_QUALITY: dict[str, tuple[float, float]] = {
    "medium": (0.91, 80.0),
    "high": (0.95, 100.0),
    "very_high": (0.97, 120.0),
}


def design_filter(up: int, down: int, quality: Quality = "high") -> np.ndarray:
    """Kaiser-windowed sinc prototype at rate up * sr_in, odd length with D a multiple of max(up, down).

    Sized with Kaiser's formula at the lower of the two rates, then stretched by max(up, down), which
    is exactly the ratio between the design rate and that lower rate.
    """
    rolloff, atten = _QUALITY[quality]
    span = max(up, down)
    transition = 2.0 * pi * (1.0 - rolloff)  # full transition width in rad/sample at the lower rate
    half = ceil((atten - 7.95) / (2.285 * transition) / 2.0)
    n = np.arange(-half * span, half * span + 1, dtype=np.float64)
    beta = 0.1102 * (atten - 8.7)
    fc = 0.5 * rolloff / span  # cutoff in cycles per sample at the design rate
    h = 2.0 * fc * np.sinc(2.0 * fc * n) * np.kaiser(len(n), beta)
    return h / h.sum()


@dataclass(frozen=True)
class Filter:
    """One rate pair's polyphase filter: `bank` = polyphase_bank(h, up), centred at d."""

    up: int
    down: int
    h: np.ndarray
    bank: np.ndarray
    d: int

    @property
    def lookahead_in(self) -> int:
        """Input samples past an output's own time that must arrive before it can be computed."""
        return -(-self.d // self.up)

    @property
    def delay_out(self) -> int:
        """The same look-ahead in output samples: the latency this stage adds to a live stream."""
        return -(-self.d // self.down)

    def total_out(self, n_in: int) -> int:
        """A whole stream's output length: round(n_in * sr_out / sr_in) (Python rounding, ties to even)."""
        return round(Fraction(n_in * self.up, self.down))


@cache
def rate_filter(sr_in: int, sr_out: int = 48000, quality: Quality = "high") -> Filter:
    """The filter of a rate pair, designed once per process. Equal rates get the identity filter:
    an exact copy with zero latency through the same path."""
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError("sample rates must be positive")
    g = gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    h = np.ones(1) if up == down else design_filter(up, down, quality)
    return Filter(up, down, h, polyphase_bank(h, up), (len(h) - 1) // 2)


class StreamingResampler:
    """Block-wise sr_in -> sr_out polyphase resampler that keeps only the input history it still needs."""

    def __init__(self, sr_in: int, sr_out: int = 48000, channels: int = 1, quality: Quality = "high"):
        if channels <= 0:
            raise ValueError("the channel count must be positive")
        f = rate_filter(sr_in, sr_out, quality)
        self.sr_in, self.sr_out, self.channels = sr_in, sr_out, channels
        self.filter, self.up, self.down, self.h, self._d, self._bank = f, f.up, f.down, f.h, f.d, f.bank
        self.reset()

    @property
    def lookahead_in(self) -> int:
        return self.filter.lookahead_in

    @property
    def delay_out(self) -> int:
        return self.filter.delay_out

    def reset(self) -> None:
        """Start a new stream: forget the history and restart absolute sample counting at zero."""
        self._hist = np.zeros((0, self.channels), dtype=np.float32)  # the last inputs, up to _n_in
        self._n_in = 0
        self._m_next = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed (frames, channels) input; return every output whose inputs have all arrived."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected (frames, {self.channels}) input, got shape {x.shape}")
        self._n_in += len(x)
        self._hist = np.concatenate([self._hist, x])
        return self._emit(ready_end(self._n_in, self._m_next, self.up, self.down, self._d))

    def flush(self) -> np.ndarray:
        """End the stream (zeros after the last input) and return the rest, then reset for reuse.

        The stream's total output is exactly round(n_in * sr_out / sr_in) samples (Python rounding,
        ties to even), whatever the block sizes were.
        """
        y = self._emit(self.filter.total_out(self._n_in))
        self.reset()
        return y

    def _emit(self, m_end: int) -> np.ndarray:
        """Compute outputs [m_next, m_end) and drop the history no later output can touch."""
        base = self._n_in - len(self._hist)  # absolute index of self._hist[0]
        y = polyphase_resample(self._bank, self.up, self.down, self._d, self._hist, base, self._m_next, m_end)
        self._m_next = m_end
        oldest = oldest_needed(m_end, self.up, self.down, self._d, self._bank.shape[1])
        self._hist = self._hist[min(max(oldest - base, 0), len(self._hist)):]
        return y


def resample(x: np.ndarray, sr_in: int, sr_out: int = 48000) -> np.ndarray:
    """Resample a whole (frames,) or (frames, channels) signal via the streaming path (process + flush)."""
    x = np.asarray(x, dtype=np.float32)
    r = StreamingResampler(sr_in, sr_out, channels=1 if x.ndim == 1 else x.shape[1])
    y = np.concatenate([r.process(x.reshape(len(x), r.channels)), r.flush()])
    return y[:, 0] if x.ndim == 1 else y
