"""Every stream's output side in one place: analysed frames waiting for their hop and the
overlap-add tail, as rows of preallocated arrays, one bank per model and channel count.

Kept per stream, every hop cost a dozen numpy calls per stream (concatenating spectra, log-mel
and band rows, slicing them back, stacking merge weights, growing and trimming an overlap-add
buffer). Here a round's frames are queued by one kernel call, a hop's model inputs and merge
inputs are gathered for all its streams by one indexing each, and one kernel call overlap-adds
them all (`rtsr.kernels.hops`). Bands are rows of a small table: a frame keeps its band's index.

Each stream's frame counters sit in its first row too (frames analysed, synthesised, samples
handed out, where its input ends), so which streams have a hop ready, and where each hop's samples
start and end, are a few array operations for all the streams of a round, not calls per stream.

A lossy input's model band is raised to the input's level at its edge (`match_levels`): a
log-domain model predicts a band's mean log power, far under the mean power of a band that swings
(speech's top band most), which left a dark line above a codec's edge. The levels are power sums
over the last LEVEL_FRAMES frames, so holes (frames a codec left empty) do not pull them down.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from rtsr.audio_spec import HOP, N_FFT
from rtsr.features import BIN_HZ, N_BINS, N_MELS, merge_weights, window
from rtsr.kernels.hops import enqueue, match_levels, overlap_add_hop, remember_levels
from rtsr.rows import RowBank, grown

assert N_FFT == 2 * HOP  # the overlap-add tail is one HOP (rtsr.kernels.hops)
INITIAL_FRAMES = 16  # queue length of a new bank; it doubles whenever a stream needs more
LEVEL_FRAMES = 40  # 200 ms of frames whose power sums set a lossy input's model band level
LEVEL_SPAN = round(500 / BIN_HZ)  # bins under the edge (input) and from it (model) compared
LEVEL_FLAT = round(1000 / BIN_HZ)  # the bins above the edge that take the whole gain...
LEVEL_TAPER = round(3000 / BIN_HZ)  # ...then it falls linearly to none over this many
MAX_LEVEL_GAIN = 10 ** (30 / 20)  # raised by at most 30 dB; never lowered
NOT_ENDED = np.iinfo(np.int64).max // 4  # the end of a stream whose input has not ended
COUNTERS = ("analysed", "synthesised", "emitted", "out_end", "hop_frames", "slot_start")


def last_frame(n_out: int | np.ndarray) -> int | np.ndarray:
    """The last frame a stream's output of n_out samples needs: frames 0..ceil(n_out / HOP) make
    every sample before n_out final."""
    return -(-n_out // HOP)


def level_taper(edge_bin: int) -> np.ndarray:
    """The share of a lossy band's level gain (in dB) each bin takes: all from the edge bin for
    LEVEL_FLAT bins, then less and less to none LEVEL_TAPER bins on; nothing under the edge (nor
    anywhere for edge_bin -1)."""
    above = np.arange(N_BINS) - edge_bin
    share = np.clip(1 - (above - LEVEL_FLAT) / LEVEL_TAPER, 0, 1)
    return (share * (above >= 0) * (edge_bin >= 0)).astype(np.float32)


class HopBank(RowBank):
    def __init__(self, channels: int, lookahead: int = 0):
        """lookahead: the model's conditioning frames beyond a hop's last (`SuperResModel.lookahead`)."""
        super().__init__(channels)
        self.lookahead = lookahead
        self.spec = np.zeros((0, INITIAL_FRAMES, N_BINS), np.complex64)
        self.mel = np.zeros((0, N_MELS, INITIAL_FRAMES), np.float32)
        self.band = np.zeros((0, INITIAL_FRAMES), np.int32)
        self.queued = np.zeros(0, np.int64)
        self.tail = np.zeros((0, HOP), np.float32)
        self.levels = np.zeros((0, LEVEL_FRAMES, 2))  # a ring of frame powers (input, model) per row
        self.level_count = np.zeros(0, np.int64)  # frames the ring has taken
        self._band_ids: dict[tuple[float, float, float], int] = {}
        self.band_hz = np.zeros(0, np.float32)
        self.band_weights = np.zeros((0, N_BINS), np.float32)
        self.edge_bin = np.zeros(0, np.int64)  # a lossy edge band's edge bin (level matched), else -1
        self.level_taper = np.zeros((0, N_BINS), np.float32)
        # per stream, at its first row: LR frames analysed (queued from frame `synthesised` on),
        # output frames synthesised, samples handed out, the output's length once the input has
        # ended (NOT_ENDED before), frames per hop, its first row in the model's bank
        for name in COUNTERS:
            setattr(self, name, np.zeros(0, np.int64))
        self.band_now = np.zeros(0, np.int32)  # the band of the stream's next analysed frame
        self.lossy = np.zeros(0, bool)  # per row: decoded from a lossy codec (holes filled, levels matched)

    def _clear(self, rows: slice) -> None:
        """Nothing queued, a silent tail, no levels, no frames."""
        self.queued[rows] = 0
        self.tail[rows] = 0.0
        self.levels[rows] = 0.0
        self.level_count[rows] = 0
        for name in COUNTERS:
            getattr(self, name)[rows] = NOT_ENDED if name == "out_end" else 0

    def _resize(self, rows: int) -> None:
        for name in ("spec", "mel", "band", "queued", "tail", "levels", "level_count", *COUNTERS, "band_now", "lossy"):
            setattr(self, name, grown(getattr(self, name), rows))

    def ready_frames(self, first: np.ndarray, all_in: np.ndarray) -> np.ndarray:
        """The length of each stream's next hop that can run now, or 0 (first: the streams' first
        rows; all_in: every frame up to its end analysed): a whole hop once its frames and the
        lookahead beyond them are analysed, at the end the frames left up to the last (`last_frame`)."""
        pos, n = self.synthesised[first], self.hop_frames[first]
        ready = np.where(self.analysed[first] - self.lookahead - pos >= n, n, 0)
        if not all_in.any():
            return ready
        left = last_frame(self.out_end[first]) + 1 - pos
        return np.where(all_in, np.clip(np.minimum(n, left), 0, None), ready)

    def band_id(self, row: tuple[float, float, float]) -> int:
        """The table index of a band row (cutoff Hz, merge start, merge end), added when new; the
        values are taken at float32, as the band tracker's frame rows hold them."""
        if (k := self._band_ids.get(row)) is not None:  # as given before (a tracker's rows repeat);
            return k  # a key is added only once its table rows are (read here without the lock)
        given, row = row, tuple(float(v) for v in np.float32(row))
        with self.lock:
            if (k := self._band_ids.get(row)) is None:
                k = len(self.band_hz)
                self.band_hz = np.append(self.band_hz, np.float32(row[0]))
                self.band_weights = np.concatenate([self.band_weights, merge_weights(row[1], row[2])[None]])
                # a fade from the edge itself is a lossy input's (rtsr.cutoff.Band.merge_range)
                e = round(row[0] / BIN_HZ) if row[1] == row[0] else -1
                self.edge_bin = np.append(self.edge_bin, e)
                self.level_taper = np.concatenate([self.level_taper, level_taper(e)[None]])
                self._band_ids[row] = k
            self._band_ids[given] = k
            return k

    def set_band_now(self, first: int, row: tuple[float, float, float]) -> None:
        """The band of a stream's next analysed frames (a band row, `band_id`)."""
        with self.lock:
            self.band_now[first] = self.band_id(row)

    def end(self, first: int, n_out: int) -> None:
        """A stream's input has ended: its output is n_out samples long."""
        with self.lock:
            self.out_end[first] = n_out

    def enqueue(self, first: np.ndarray, counts: np.ndarray, at: np.ndarray, band_now: np.ndarray,
                spec: np.ndarray, mel: np.ndarray) -> None:
        """Queue each stream's new frames (see `rtsr.kernels.hops.enqueue`; first: the streams'
        first rows), the queue grown first if a stream needs more room, and count them analysed."""
        with self.lock:
            need = int((self.queued[first] + counts).max()) if len(first) else 0
            if need > self.spec.shape[1]:
                self._grow_frames(need)
            enqueue(first, counts, at, self.channels, band_now, spec, mel, self.spec, self.mel, self.band,
                    self.queued)
            self.analysed[first] += counts

    def overlap_add(self, first: np.ndarray, n: int, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A hop of n frames of these streams (first rows) done: `rtsr.kernels.hops.overlap_add_hop`
        on their rows (frames: theirs, row by row), the samples each hands out from its first on,
        up to its end; they count as synthesised. Returns (samples (rows, n HOP), each stream's
        count of them)."""
        rows = (first[:, None] + np.arange(self.channels)).ravel()
        with self.lock:
            start = (self.synthesised[first] - 1) * HOP  # the hop's first sample, relative to each stream's
            since, until = (np.repeat(v - start, self.channels) for v in (self.emitted[first], self.out_end[first]))
            y, made = overlap_add_hop(rows, frames, window(), HOP, since, until, self.tail, self.spec, self.mel,
                                      self.band, self.queued)
            made = made[::self.channels]
            self.synthesised[first] += n
            self.emitted[first] += made
        return y, made

    def match_levels(self, rows: np.ndarray, lossy: np.ndarray, band: np.ndarray, gen: np.ndarray) -> np.ndarray:
        """`rtsr.kernels.hops.match_levels` on these rows (gen changed in place); the frames'
        powers come back for `remember_levels`, called once the hop is done."""
        with self.lock:
            return match_levels(rows, lossy, self.spec, band, self.edge_bin, self.level_taper, gen, self.levels,
                                self.level_count, LEVEL_SPAN, MAX_LEVEL_GAIN)

    def remember_levels(self, rows: np.ndarray, lossy: np.ndarray, powers: np.ndarray) -> None:
        with self.lock:
            remember_levels(rows, lossy, powers, self.levels, self.level_count)

    def _grow_frames(self, need: int) -> None:
        frames = max(2 * self.spec.shape[1], need)
        for name, axis in (("spec", 1), ("mel", 2), ("band", 1)):
            setattr(self, name, grown(getattr(self, name), frames, axis))


_banks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_banks_lock = threading.Lock()


def join(owner: object, model: object, channels: int, hop_frames: int, lossy: bool,
         slot_start: int) -> tuple[HopBank, int]:
    """Rows for `owner` (a stream of hops of hop_frames frames; lossy: decoded from a lossy codec;
    slot_start: its first row in the model's bank) in the bank of its model and channel count,
    given back when the owner is gone."""
    with _banks_lock:
        bank = _banks.setdefault(model, {}).setdefault(channels, None)
        if bank is None:
            bank = _banks[model][channels] = HopBank(channels, model.lookahead)
    row = bank.join_for(owner)
    with bank.lock:
        bank.hop_frames[row], bank.slot_start[row] = hop_frames, slot_start
        bank.lossy[row:row + channels] = lossy
    return bank, row
