"""Every stream's input side in one place: the resampler's history and the 48 kHz samples not yet
framed, as rows of preallocated arrays, one bank per input rate and channel count.

Kept per stream, each round cost a dozen small numpy calls per stream (concatenating history and
input, slicing it back, growing and trimming the 48 kHz buffer); here one kernel call
(`rtsr.kernels.intake.intake`) takes the new input of every stream of a bank to windowed analysis
frames. A stream owns `channels` consecutive rows (rtsr.rows).
"""

from __future__ import annotations

import threading

import numpy as np

from rtsr.audio_spec import HOP, N_FFT, SR
from rtsr.features import window
from rtsr.kernels.intake import intake
from rtsr.resample import rate_filter
from rtsr.rows import RowBank, grown

HALF = N_FFT // 2
SPARE_HISTORY = 16  # inputs over the filter's span that a row's history may hold between calls


class IntakeBank(RowBank):
    def __init__(self, input_sr: int, channels: int):
        super().__init__(channels)
        self.filter = rate_filter(input_sr, SR)
        self._hist = np.zeros((0, self.filter.bank.shape[1] + SPARE_HISTORY), np.float32)
        self._x48 = np.zeros((0, N_FFT + HOP), np.float32)  # an unframed tail is shorter than this
        self._ints = {k: np.zeros(0, np.int64) for k in ("hist_len", "n_in", "m_next", "x48_len", "x48_base", "framed")}

    def _clear(self, rows: slice) -> None:
        """No input yet, HALF zeros before t = 0 (the first frame is centred on the first sample)."""
        for k, v in self._ints.items():
            v[rows] = -HALF if k == "x48_base" else HALF if k == "x48_len" else 0
        self._x48[rows, :HALF] = 0.0

    def _resize(self, rows: int) -> None:
        self._hist, self._x48 = grown(self._hist, rows), grown(self._x48, rows)
        self._ints = {k: grown(v, rows) for k, v in self._ints.items()}

    def take(self, first_rows: np.ndarray, new: np.ndarray, new_at: np.ndarray, m_end_given: np.ndarray,
             pad_until: np.ndarray, hand_back: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`rtsr.kernels.intake.intake` on these streams' rows: (windowed frames, new frames per
        stream, 48 kHz samples made for the streams handed them (hand_back), their count per stream)."""
        f = self.filter
        with self.lock:  # the arrays taken inside: a stream joining on another thread may replace them
            i = self._ints
            return intake(f.bank, f.up, f.down, f.d, first_rows, new, new_at, m_end_given, pad_until, hand_back,
                          self._hist, i["hist_len"], i["n_in"], i["m_next"], self._x48, i["x48_len"],
                          i["x48_base"], i["framed"], window(), HOP)


_banks: dict[tuple[int, int], IntakeBank] = {}
_banks_lock = threading.Lock()


def intake_bank(input_sr: int, channels: int) -> IntakeBank:
    """The process's bank for streams of this rate and channel count."""
    with _banks_lock:
        bank = _banks.get((input_sr, channels))
        if bank is None:
            bank = _banks[input_sr, channels] = IntakeBank(input_sr, channels)
        return bank


def join(owner: object, input_sr: int, channels: int) -> tuple[IntakeBank, int]:
    """Rows for `owner` (a stream) in its bank, given back when the owner is gone."""
    bank = intake_bank(input_sr, channels)
    return bank, bank.join_for(owner)
