"""Band edge: where the input's real band ends, whatever its sample rate.

Most band-limited audio is stored at a rate far above its band (an MP3 at 44.1 kHz whose encoder
cut at 16 kHz, a phone call exported at 48 kHz), so the rate only gives an upper bound (the
"rate" band: its Nyquist, capped at 24 kHz) and the spectrum decides. The detector has an analysis
of its own: the long-term power spectrum of 4096-point Blackman-Harris frames (11.7 Hz bins,
sidelobes 92 dB down), because the engine's 480-point sqrt-Hann STFT leaks a brick-wall edge ~2 kHz
upwards. A low-pass *edge* is where that spectrum falls, within a few hundred Hz, to a level at
least 30 dB under the band just below it and stays there (90 % of the bins) up to the rate's
Nyquist; natural roll-off never does that, and a few resampling images or codec birdies above the
edge do not hide it. A softer edge — a resampler's or an IIR filter's skirt falling over a couple
of kHz, as in 16 kHz audio stored in a 44.1 kHz file — is looked for second, below 12 kHz only (real
full-band recordings roll off that steeply in their top octave): within 30 % above the knee the
spectrum must reach 35 dB under the band below it and stay there, and the edge is where it first
falls 6 dB (a resampler's half-amplitude point is its Nyquist). AudioSR's 98.5 %-of-magnitude rule
would instead cut inside the real band.

Streaming stability: the cutoff moves at most twice. It is lowered (or not) once, at the first
200 ms frame boundary at least 200 ms after a second of active audio; a lowered cutoff is restored
to the rate's band, for good, at the first 1 s boundary where the long-term spectrum shows content
above it (keeping more of the input is always safe); after ten such checks without it the band is
settled and watched no more (the watching cost a phone-band stream more than the rest of its hop).
Decisions fall on fixed frame boundaries and see only detector frames that end 200 ms before them
(so that a server's streams can each make theirs in a round of their own), so any block sizes give
the same cutoff for every frame. A file can instead be scanned whole first (`scan_band`) and
streamed with the band it found, fixed from its first sample.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from itertools import chain, count
from typing import NamedTuple

import numpy as np

from rtsr.audio_spec import HOP, N_FFT, SR

DETECT_FFT = 4096  # detector frame (85 ms at 48 kHz): 11.7 Hz bins
DETECT_HOP = DETECT_FFT // 2
UPDATE_EVERY = 40  # engine frames (200 ms) between decisions
WATCH_EVERY = 200  # ...once lowered, between the checks for content above it (1 s: each costs ~0.1 ms)
WATCH_CHECKS = 10  # ...and the checks made before the lowered band counts as settled (the watching ends)
DECIDE_AFTER = 24  # active detector frames (~1 s of audio) of evidence before the first decision
COMMIT_FRAMES = 2  # complete detector frames a deciding stream holds before it makes them (one FFT call)
DECIDE_LAG = UPDATE_EVERY  # a decision at frame d sees the detector frames that end by frame d - this
ACTIVE_DBFS = -70.0  # a detector frame whose RMS is above this counts as signal
GRID_HZ = 50.0  # the long-term spectrum is pooled into bands this wide before the edge search
EMPTY_DB = 30.0  # above an edge, 80 % of the bands sit at least this far under the band below it
PEAK_GAP_DB = 50.0  # ...and this far under the spectrum's peak (a tonal sound's quiet rest is not "empty")
LOUD_SHARE = 0.2  # the rest may hold resampling images, codec birdies, a noise floor
TOP_DB = 10.0  # the edge: the last band before the fall within this of the plateau below it
STEEP_DB = 20.0  # ...and the level falls at least this much within 600 Hz or 15 % of it
STEEP_SPAN = 0.15
MIN_EDGE_HZ, MAX_EDGE_HZ = 1000.0, 19800.0  # edges outside are not looked for ("full band" above)
MAX_EDGE_RATIO = 0.92  # x the rate's Nyquist: higher "edges" are the resampler's own roll-off
MIN_CUTOFF_HZ = 1000.0  # a given cutoff below this is refused
EDGE_MARGIN = 0.035  # x the edge: the input is kept whole this far above an edge
RATE_FADE = (0.93, 0.98)  # x a rate band's Nyquist: where the input's weight starts to fall, where it is 0
CODEC_FADE_HZ = 300.0  # a lossy input's weight falls to 0 over this many Hz from its edge
SLOPE_SPAN = 0.3  # a soft edge: x the knee within which the spectrum must reach the floor...
SLOPE_EMPTY_DB = 35.0  # ...this far under the band below the knee
SLOPE_DROP_DB = 6.0  # its edge: the first point SLOPE_DROP_DB under the band below the knee
SLOPE_MAX_HZ = 12000.0  # soft edges are not looked for above this (natural top-octave roll-off)


@dataclass(frozen=True)
class Band:
    """Where the input's band ends (Hz) and who says so: "rate" (its Nyquist), "detected", "given".

    The source decides the low-band merge: below a rate's Nyquist the resampler already rolls off,
    so the input is faded out over RATE_FADE x it, across the resampler's own transition (its
    passband ends at 0.90 x, -6 dB at 0.95 x; dev set, in-band LSD x sinc: 0.4635 fading over
    [0.88, 0.96], where the model's mel is replaced, 0.4616 over [0.93, 0.98]; RESULTS.md,
    2026-12-05); an edge (detected
    or given) is where content really stops, so the input is kept whole up to just above it and
    faded out over the next 4 %: nothing generated lands below the edge, nor leaks into the input's
    weak top through the synthesis window (measured on codec-limited 48 kHz music: generation from
    the edge itself changed the in-band LSD of the "untouched" band by 0.07-0.11, from 2.5 % above
    it by 0.01-0.055, from 3.5 % above it by 0.007-0.038). Fading over 0.92-0.98 ... 1.025-1.055 x
    the edge, or keeping the model whole across the fade, shrinks the seam the fade cuts into the
    model's band (real-world dev cases with one over 6 dB: 44 -> 35-41 of 60), and telling the model
    a cutoff 3-6 % under the edge raises its band there (39-25 of 60), but each takes a codec-cut
    full-band input, a no-room Vorbis or a with-room case past the bandwidth bar
    (benchmarks/RESULTS.md, 2026-12-04).

    A lossy input's edge (decoded MP3, Vorbis, Opus) is its encoder's low-pass, a brick wall: the
    input holds nothing above it, so its fade runs from the edge itself over CODEC_FADE_HZ, and the
    model's band there is raised to the input's level under the edge (rtsr.hopbank, `LEVEL_FRAMES`):
    real-world dev cases with a seam over 6 dB 44 -> 19 of 60 (RESULTS.md, 2026-12-05).
    """

    hz: float
    source: str = "given"

    @property
    def full(self) -> bool:
        """A full band (no edge below the output's Nyquist): nothing to add, only resample."""
        return self.source == "rate" and self.hz >= SR / 2

    def merge_range(self, lossy: bool = False) -> tuple[float, float]:
        """(Hz where the input's weight starts to fall, Hz where it reaches 0); lossy: the input
        was decoded from a lossy codec."""
        if self.full:
            return math.inf, math.inf
        if self.source == "rate":
            return RATE_FADE[0] * self.hz, RATE_FADE[1] * self.hz
        if lossy:
            return self.hz, self.hz + CODEC_FADE_HZ
        return (1 + EDGE_MARGIN) * self.hz, (1 + EDGE_MARGIN + 0.04) * self.hz

    def row(self, lossy: bool = False) -> tuple[float, float, float]:
        return (self.hz, *self.merge_range(lossy))


def rate_band(input_sr: float) -> Band:
    return Band(min(input_sr / 2, SR / 2), "rate")


def given_band(cutoff_hz: float, input_sr: float) -> Band:
    """A user's cutoff, checked: 1 kHz .. the input's Nyquist (and the output's)."""
    top = min(input_sr / 2, SR / 2)
    if not (math.isfinite(cutoff_hz) and MIN_CUTOFF_HZ <= cutoff_hz <= top):
        raise ValueError(f"cutoff {cutoff_hz:g} Hz is outside {MIN_CUTOFF_HZ:g}..{top:g} Hz "
                         f"(1 kHz to the Nyquist of a {input_sr:g} Hz input)")
    return Band(float(cutoff_hz), "given")


def as_band(cutoff: float | Band | None, input_sr: float) -> Band | None:
    """A cutoff as callers pass it: None (to be found), a number of Hz (checked), or a Band."""
    return given_band(cutoff, input_sr) if isinstance(cutoff, int | float) else cutoff


def cutoff_arg(text: str) -> float | None:
    """'auto' -> None (found from the audio), else a frequency in Hz within 1..24 kHz (each input's
    Nyquist is checked when it is opened)."""
    if text == "auto":
        return None
    try:
        hz = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a frequency in Hz, got {text!r}") from None
    if not (math.isfinite(hz) and MIN_CUTOFF_HZ <= hz <= SR / 2):
        raise argparse.ArgumentTypeError(f"cutoff must be 'auto' or {MIN_CUTOFF_HZ:g}..{SR / 2:g} Hz, got {text!r}")
    return hz


@cache
def _window() -> np.ndarray:
    """4-term Blackman-Harris: sidelobes 92 dB down, so an edge does not leak over the empty band."""
    a = (0.35875, 0.48829, 0.14128, 0.01168)
    n = np.arange(DETECT_FFT) * 2 * np.pi / DETECT_FFT
    return (a[0] - a[1] * np.cos(n) + a[2] * np.cos(2 * n) - a[3] * np.cos(3 * n)).astype(np.float32)


@cache
def _active_power() -> float:
    """Mean bin power of a frame of white noise at ACTIVE_DBFS RMS (per channel)."""
    w = _window()
    return 10 ** (ACTIVE_DBFS / 10) * float((w ** 2).sum())


class LongTermSpectrum:
    """Mean power spectrum of the active detector frames of a 48 kHz signal, fed in any blocks.

    Frame k covers samples [k * DETECT_HOP, k * DETECT_HOP + DETECT_FFT); `commit(until)` counts
    every frame that ends at or before sample `until` and whose samples have all come, so the sum
    at any sample position is the same whatever the block sizes were. `feed` only keeps the
    samples; frames are made when committed, all in one FFT call (a live stream's tracker commits
    them two at a time, not one call per block: most of its rounds cost an append).
    """

    def __init__(self, channels: int):
        self.channels = channels
        self.blocks: list[np.ndarray] = []  # the samples from `base` on, not yet framed
        self.held = 0  # ...their count
        self.base = 0  # absolute index of the first held sample
        self.power = np.zeros(DETECT_FFT // 2 + 1)
        self.active = 0

    @property
    def fed(self) -> int:
        """The samples fed so far (the absolute index after the last)."""
        return self.base + self.held

    def feed(self, x: np.ndarray) -> None:
        """x: (samples, channels) continuing the signal (kept, not copied: not to be changed after)."""
        if len(x):
            self.blocks.append(np.asarray(x, np.float32))
            self.held += len(x)

    def commit(self, until: int | None = None) -> None:
        """Count every frame whose samples have come that ends at or before sample `until` (all if None)."""
        if n := self.due(until):
            self.count(_spectra(self.frames(n)))

    def due(self, until: int | None = None) -> int:
        """The frames `commit(until)` counts now."""
        end = self.fed if until is None else min(until, self.fed)
        return max((end - self.base - DETECT_FFT) // DETECT_HOP + 1, 0)

    def frames(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """The next n frames (n <= `due()`), windowed, for `count`: into `out`, (n, channels,
        DETECT_FFT) float32, made if None."""
        from rtsr.kernels.spectrum import windowed  # numba: not for the protocol's imports

        if len(self.blocks) > 1:
            self.blocks = [np.concatenate(self.blocks)]
        if out is None:
            out = np.empty((n, self.channels, DETECT_FFT), np.float32)
        return windowed(np.ascontiguousarray(self.blocks[0]), n, DETECT_HOP, _window(), out)

    def count(self, spec: np.ndarray) -> None:
        """Count the next frames from their spectra (the real FFT of `frames` along its last axis):
        frame by frame, in order, so the sums are the same for any number at a time."""
        from rtsr.kernels.spectrum import count_loud

        n = len(spec)
        self.active += count_loud(spec, np.float32(_active_power() * self.channels), self.power)
        rest = self.blocks[0][n * DETECT_HOP:]
        self.blocks, self.held, self.base = [rest] if len(rest) else [], len(rest), self.base + n * DETECT_HOP

    def mean(self) -> np.ndarray:
        return self.power / max(self.active, 1)


def _spectra(frames: np.ndarray) -> np.ndarray:
    """The detector frames' real FFT along their last axis (float32 in, complex64 out). torch's:
    a third of scipy's time for a batch of 4096-point frames (RESULTS.md), and each row's FFT is
    its own, whatever the batch (tested), so a spectrum's sums do not depend on how its frames
    were grouped."""
    import torch  # not for the protocol's imports (it takes `given_band` from here)

    return torch.fft.rfft(torch.from_numpy(frames), dim=-1).numpy()


def due_spectra(due: list[tuple[LongTermSpectrum, int]]) -> list[np.ndarray | None]:
    """For each (spectrum, until), the spectra of the frames `spectrum.commit(until)` would count
    (None: none is due), for its `count`: all made by one FFT call (`_spectra`: a server's
    deciding streams make theirs in the same round, and a batch costs far less a frame than a
    frame or two at a time), so the counts are `commit`'s. Nothing is counted here."""
    todo = [(lts, lts.due(until)) for lts, until in due]
    at = np.cumsum([0, *(n * lts.channels for lts, n in todo)])  # each spectrum's first row of frames
    rows = np.empty((at[-1], DETECT_FFT), np.float32)
    for (lts, n), a, b in zip(todo, at[:-1], at[1:], strict=True):
        if n:
            lts.frames(n, rows[a:b].reshape(n, lts.channels, DETECT_FFT))
    spec = _spectra(rows) if len(rows) else None
    return [spec[a:b].reshape(n, lts.channels, -1) if n else None
            for (lts, n), a, b in zip(todo, at[:-1], at[1:], strict=True)]


def _pooled_db(power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Long-term spectrum -> (band centres in Hz, level in dB) on the GRID_HZ grid."""
    per = round(GRID_HZ / (SR / DETECT_FFT))
    n = (len(power) - 1) // per
    pooled = power[1:1 + n * per].reshape(n, per).mean(axis=1)
    centres = (np.arange(n) * per + 1 + (per - 1) / 2) * (SR / DETECT_FFT)
    return centres, 10 * np.log10(np.maximum(pooled, 1e-30))


def find_edge(power: np.ndarray, top_hz: float) -> float | None:
    """The band edge (Hz) in a long-term power spectrum whose band cannot exceed top_hz, or None:
    a steep cliff if there is one, else a soft low-pass skirt below SLOPE_MAX_HZ."""
    f, level = _pooled_db(power)
    ceiling = level[f >= 50].max() - PEAK_GAP_DB  # what an empty band stays under: PEAK_GAP_DB under the peak
    edge = _cliff_edge(f, level, top_hz, ceiling)
    return edge if edge is not None else _slope_edge(f, level, top_hz, ceiling)


def _cliff_edge(f: np.ndarray, level: np.ndarray, top_hz: float, ceiling: float) -> float | None:
    """The band edge (Hz) in a long-term spectrum (`_pooled_db`) whose band cannot exceed top_hz, or None.

    Scanning up from 1 kHz, the first position b where 80 % of the bands from 250 Hz above b up to
    0.99 x top_hz, and 80 % of its first kHz, sit EMPTY_DB under the band just below b (median of
    600 Hz) and PEAK_GAP_DB under the spectrum's peak, and the level falls by STEEP_DB within 600 Hz
    (or 15 %) of b. The edge is the top of that cliff: the last band before its steepest point (250 Hz
    either side, within 600 Hz of b) still within TOP_DB of the plateau before it.
    """
    top = np.searchsorted(f, 0.99 * top_hz)
    below_n, gap, steep_n, step_n, near_n = (round(hz / GRID_HZ) for hz in (600, 250, 600, 250, 1000))
    limit = min(MAX_EDGE_RATIO * top_hz, MAX_EDGE_HZ)
    start = max(np.searchsorted(f, MIN_EDGE_HZ), 5 * below_n)
    stop = min(np.searchsorted(f, limit), top - gap - round(1000 / GRID_HZ))  # >= 1 kHz above to judge
    if stop <= start:
        return None
    from rtsr.kernels.edges import first_quiet  # numba: not for the protocol's, broker's and client's imports

    cand = np.arange(start, stop)
    reach = np.maximum(steep_n, np.round(STEEP_SPAN * f[cand] / GRID_HZ)).astype(np.int64)
    hit = first_quiet(level, top, cand, below_n, EMPTY_DB, ceiling,
                      np.minimum(cand + reach, top - 1), STEEP_DB, cand + gap, near_n, LOUD_SHARE)
    if hit < 0:
        return None
    b = cand[hit]
    pos = np.arange(b - below_n, min(b + steep_n, top - step_n) + 1)  # the steepest point of the fall
    means = np.lib.stride_tricks.sliding_window_view(level, step_n).mean(axis=1)  # means[i]: level[i:i + step_n]
    fall = means[pos - step_n] - means[pos]
    steepest = pos[int(np.argmax(fall))]
    plateau = np.median(level[steepest - 4 * below_n:steepest - 2 * below_n])
    kept = np.nonzero(level[steepest - 2 * below_n:steepest] >= plateau - TOP_DB)[0]  # the cliff's top
    edge = float(f[steepest - 2 * below_n + kept[-1]] if len(kept) else f[steepest] - GRID_HZ / 2)
    return edge if MIN_EDGE_HZ <= edge <= limit else None


def _slope_edge(f: np.ndarray, level: np.ndarray, top_hz: float, ceiling: float) -> float | None:
    """A soft edge: scanning up from 1 kHz, the first knee b where 80 % of the bands from
    (1 + SLOPE_SPAN) x b to 0.99 x top_hz, and of their first kHz, sit SLOPE_EMPTY_DB under the
    band just below b (median of 600 Hz) and PEAK_GAP_DB under the peak. The edge is the first point
    above b where the level (250 Hz average) is SLOPE_DROP_DB under that band. The knees are
    judged in one compiled scan, as `_cliff_edge`'s positions (`rtsr.kernels.edges.first_quiet`)."""
    top = np.searchsorted(f, 0.99 * top_hz)
    below_n, near_n = round(600 / GRID_HZ), round(1000 / GRID_HZ)
    limit = min(MAX_EDGE_RATIO * top_hz, SLOPE_MAX_HZ)
    cand = np.arange(max(np.searchsorted(f, MIN_EDGE_HZ), 5 * below_n), np.searchsorted(f, limit))
    floor_from = cand + np.maximum(below_n, np.round(SLOPE_SPAN * f[cand] / GRID_HZ)).astype(int)
    cand, floor_from = cand[top - floor_from >= near_n], floor_from[top - floor_from >= near_n]  # room to judge
    if not len(cand):
        return None
    from rtsr.kernels.edges import first_quiet

    k = first_quiet(level, top, cand, below_n, SLOPE_EMPTY_DB, ceiling,
                    np.full(len(cand), -1), 0.0, floor_from, near_n, LOUD_SHARE)
    if k < 0:
        return None
    b, smooth = cand[k], np.convolve(level, np.ones(5) / 5, mode="same")
    fall = np.nonzero(smooth[b:floor_from[k]] < np.median(level[b - below_n:b]) - SLOPE_DROP_DB)[0]
    edge = float(f[b + fall[0]]) if len(fall) else None
    return edge if edge is not None and MIN_EDGE_HZ <= edge <= limit else None


def scan_band(x: np.ndarray, input_sr: int, block: int = 1 << 16) -> Band:
    """The band of a whole signal ((frames, channels) at input_sr): what a file holds, known
    before its first sample is upscaled."""
    return scan_band_blocks((x[i:i + block] for i in range(0, len(x), block)), input_sr, x.shape[1])


def scan_band_blocks(blocks: Iterable[np.ndarray], input_sr: int, channels: int) -> Band:
    """scan_band over (frames, channels) blocks as they are read: memory stays one block's worth."""
    from rtsr.resample import StreamingResampler  # numba: not for the protocol's, broker's and client's imports

    rs = StreamingResampler(input_sr, SR, channels)
    at_48k = (rs.process(np.ascontiguousarray(b, dtype=np.float32)) for b in blocks)
    return band_of_48k(chain(at_48k, [rs.flush()]), channels, input_sr)


def band_of_48k(blocks: Iterable[np.ndarray], channels: int, input_sr: float) -> Band:
    """The band of a whole signal already at 48 kHz, given as (samples, channels) blocks; each block's
    frames are counted at once, so memory stays one block's worth whatever the length."""
    lts = LongTermSpectrum(channels)
    for y in blocks:
        lts.feed(y)
        lts.commit()
    return band_of(lts, input_sr)


def band_of(lts: LongTermSpectrum, input_sr: float) -> Band:
    full = rate_band(input_sr)
    edge = find_edge(lts.mean(), full.hz) if lts.active else None
    return Band(edge, "detected") if edge is not None else full


class _TrackerState(NamedTuple):
    """What a decision sets: the band, whether it was lowered, whether decisions go on, the checks
    made on a lowered band."""

    band: Band
    lowered: bool
    deciding: bool
    checks: int


def _decision_every(lowered: bool) -> int:
    """Engine frames between a tracker's decisions."""
    return WATCH_EVERY if lowered else UPDATE_EVERY


class CutoffTracker:
    """Per-frame band of one stream: rows of (cutoff Hz, merge start Hz, merge end Hz).

    The decision that takes effect at frame d sees the detector frames that end by frame d -
    DECIDE_LAG, so it can be made in any round between those frames' arrival and frame d: each
    tracker makes its own at a turn of its own within that window (`take`, `decide`), and streams that
    started together do not all decide in one round. When it is made changes nothing it holds; a
    decision still pending when frame d is analysed is made then."""

    _turns = count()

    def __init__(self, input_sr: float, channels: int, fixed: Band | None = None, lossy: bool = False):
        """lossy: the stream is decoded from a lossy codec (`Band.merge_range`)."""
        self.input_sr, self.lossy = input_sr, lossy
        self.current = fixed or rate_band(input_sr)
        self.deciding = fixed is None  # still allowed to move
        self.lowered = False
        self.checks = 0  # made on a lowered band
        self.spectrum = LongTermSpectrum(channels) if self.deciding else None
        self.boundary = UPDATE_EVERY  # the next decision frame not made yet (0: none)
        self.pending: tuple[int, _TrackerState] | None = None  # (frame, the state its decision sets)
        self.turn = next(self._turns) % DECIDE_LAG + 1  # frames after its data are complete that it decides
        # ...and the samples it holds past COMMIT_FRAMES frames before it commits them: trackers fed
        # alike (streams that started together) commit in different rounds, not all in one
        offset = (self.turn * HOP) % (COMMIT_FRAMES * DETECT_HOP)
        self.commit_at = DETECT_FFT + (COMMIT_FRAMES - 1) * DETECT_HOP + offset

    def take(self, x48: np.ndarray) -> int | None:
        """The stream's next 48 kHz samples (samples, channels; from its first sample on), kept.
        Returns the sample up to which the spectrum is to be committed now, or None, and then no
        decision is due. Once COMMIT_FRAMES frames are held, those that end by the next decision's
        data are committed (the decision would count the same ones, in the same order): a decision
        round does not make a second's frames at once, and streams that started together do not
        all make theirs in one round. After the commit (many trackers' frames in one FFT call:
        `due_spectra`), `decide` makes the next decision at this tracker's turn."""
        if not (self.deciding and len(x48)):
            return None
        self.spectrum.feed(x48)
        if not self.boundary:  # the pending decision ends the deciding
            return None
        data_end = self._data_end(self.boundary)
        if self._decision_due() or self.spectrum.held >= self.commit_at:
            return data_end
        return None

    def decide(self) -> None:
        """The next decision, at this tracker's turn (after `take`'s commit)."""
        if self._decision_due():
            self._prepare(self.boundary)

    def _decision_due(self) -> bool:
        return (self.deciding and bool(self.boundary) and self.pending is None
                and self.spectrum.fed >= self._data_end(self.boundary) + self.turn * HOP)

    def rows(self, t0: int, t1: int) -> np.ndarray:
        """(t1 - t0, 3) rows for engine frames t0..t1-1; frame t's window ends at t*HOP + N_FFT/2.
        The band can only move at a decision frame (a multiple of UPDATE_EVERY, of WATCH_EVERY
        once lowered): the frames between two are one row repeated."""
        out = np.empty((max(t1 - t0, 0), 3), np.float32)
        t = t0
        while t < t1:
            if self.deciding and t and t % self._every() == 0:
                if self.pending is None:
                    self._prepare(t)
                self._apply()
            upto = min(t1, (t // self._every() + 1) * self._every()) if self.deciding else t1
            out[t - t0:upto - t0] = self.row()
            t = upto
        return out

    def decides_within(self, t0: int, t1: int) -> bool:
        """Whether engine frames t0..t1-1 hold a decision frame (where the band may move)."""
        if not self.deciding:
            return False
        every = self._every()
        return -(-max(t0, 1) // every) * every < t1

    def _every(self) -> int:
        return _decision_every(self.lowered)

    @staticmethod
    def _data_end(frame: int) -> int:
        """The sample by which the detector frames that the decision at `frame` sees end."""
        return (frame - DECIDE_LAG) * HOP + N_FFT // 2

    def row(self) -> tuple[float, float, float]:
        """The current band's row."""
        return self.current.row(self.lossy)

    def _prepare(self, frame: int) -> None:
        """Make the decision that takes effect at `frame` (the next one), kept until then."""
        self.spectrum.commit(self._data_end(frame))
        state = _TrackerState(self.current, self.lowered, self.deciding, self.checks)
        if self.spectrum.active >= DECIDE_AFTER:
            state = self._decided()
        self.pending = (frame, state)
        every = _decision_every(state.lowered)
        self.boundary = (frame // every + 1) * every if state.deciding else 0

    def _apply(self) -> None:
        state, self.pending = self.pending[1], None
        self.current, self.lowered, self.deciding, self.checks = state
        if not self.deciding:
            self.spectrum = None

    def _decided(self) -> _TrackerState:
        """The state a decision on the spectrum counted so far sets."""
        found = band_of(self.spectrum, self.input_sr)
        if not self.lowered and found.source == "detected":
            return _TrackerState(found, True, True, 0)
        if not self.lowered:
            return _TrackerState(self.current, False, False, 0)
        if found.source != "detected" or found.hz > self.current.hz + 500:
            return _TrackerState(rate_band(self.input_sr), True, False, self.checks)
        return _TrackerState(self.current, True, self.checks + 1 < WATCH_CHECKS, self.checks + 1)
