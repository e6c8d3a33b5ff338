"""Offline upscaling of whole signals: the live engine's streams, cut and batched for speed.

A signal's band is found from the decoded samples (unless given), then it is cut into long
segments, and every segment of every signal is a `Stream` with that band fixed; all of them run
together, one model call per round for all their hops (`rtsr.batch.step`), split over `workers`
threads. A segment's stream starts `warm_frames` (and the resampler's filter) before the part it
keeps, more than every network's reach into the past, so by then it computes what a stream over
the whole signal computes; it ends a few frames past that part, so the kept parts, side by side,
are the samples of one stream over the whole signal: the same bits (tested). Cutting needs
frames whose output does not depend on where a stream started: a regression (no noise) or a
sampler whose noise is scaled to nothing (temperature 0); other models get one segment a signal.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import gcd
from typing import TYPE_CHECKING

import numpy as np

from rtsr.batch import step
from rtsr.cutoff import Band, scan_band
from rtsr.engine import HALF, Stream
from rtsr.features import HOP, SR
from rtsr.hopbank import LEVEL_FRAMES
from rtsr.models.nets import receptive_field
from rtsr.resample import rate_filter, resample

if TYPE_CHECKING:
    from rtsr.upscaler import Upscaler

OFFLINE_HOP_MS = 2000.0  # big hops: fewer, larger model calls (400 frames: ~10 % less time a frame than 100)
OFFLINE_BLOCK = 1 << 18  # samples fed at a time: bounded memory whatever the length
WARM_SPARE_FRAMES = 4  # frames of warm-up beyond the receptive field and the analysis window
MIN_SEGMENT_S = 8.0  # shorter segments would spend more than ~10 % of their compute on warm-up
CPU_CALL_FRAMES = 800  # frames of one model call on a CPU: 2 x 400 is 2 % cheaper a frame than 1, 10 x 400 5 % dearer


@dataclass(frozen=True)
class Signal:
    """One whole signal to upscale: (frames, channels) float32 at `sr`; band None: found from it."""

    x: np.ndarray
    sr: int
    band: Band | None = None
    fill_holes: bool = False


@dataclass(frozen=True)
class Segment:
    """A stream over input samples [start, end) of one signal, flushed at `end`; it hands out the
    output of [keep, stop). `start` and `keep` fall on 5 ms frames of the output (see `plan`)."""

    signal: int
    start: int
    keep: int
    stop: int
    end: int

    def kept(self, y: np.ndarray, sr: int) -> np.ndarray:
        """The part of the stream's output `y` this segment hands out."""
        at = self.start * SR // sr
        return y[self.keep * SR // sr - at:round(self.stop * SR / sr) - at]


def warm_frames(up: Upscaler) -> int:
    """Frames a segment's stream runs before the part it keeps: every network's past reach (each
    sampler step's denoiser, then the vocoder) and a lossy input's level window over the model's
    output (rtsr.hopbank.LEVEL_FRAMES), the conditioning's look-ahead, one analysis window."""
    m = up.model
    reach = max(m.steps, 1) * receptive_field(m.denoiser) + receptive_field(m.vocoder) + LEVEL_FRAMES
    return reach + m.lookahead + HALF // HOP + WARM_SPARE_FRAMES


def cuttable(up: Upscaler) -> bool:
    """Whether a frame's output is the same wherever its stream started (see the module's note)."""
    return up.model.steps == 0 or up.model.temperature == 0


def plan(signal: int, n: int, sr: int, up: Upscaler, parts: int) -> list[Segment]:
    """The segments of `signal` (n samples at sr): about `parts` of them, at least MIN_SEGMENT_S
    long, or one whole if the model's output depends on where a stream starts.

    A stream started at input sample s computes what a stream over the whole signal does once
    its resampler, analysis and networks have seen enough (`warm_frames` and the resampler's
    filter), if s lands on an output frame: s * 48000 / sr a multiple of HOP, i.e. s a multiple
    of sr / gcd(sr, 200) (its resampler then also starts on the same filter phase). And every
    frame a segment keeps is computed in a whole hop, as in a stream over the whole signal: ONNX
    Runtime's matrix products give some frames other bits in a hop of a few dozen frames than in
    a long one (measured on `basic`: 34, 35, 37, 38 frames). So a segment ends where its own
    last whole hop does, and the last segment starts on a hop of the whole stream (its short
    last hop then has as many frames as the whole stream's)."""
    if not cuttable(up) or n == 0:
        return [Segment(signal, 0, 0, n, n)]
    unit = SR // HOP // gcd(sr, SR // HOP)  # frames between two starts that land on an input sample
    hop = round(OFFLINE_HOP_MS * SR / 1000) // HOP  # frames; a multiple of unit (which divides 200)
    reach = rate_filter(sr).lookahead_in * SR // sr // HOP + 1  # the filter, in frames
    warm = -(-(warm_frames(up) + 2 * reach) // unit) * unit
    tail = up.model.lookahead + 2 + 2 * reach  # frames fed past a segment's last hop
    frames = -(-n * SR // (sr * HOP))
    lo = round(MIN_SEGMENT_S * SR / HOP)
    hops = max(round(max(-(-frames // max(parts, 1)), lo) / hop), 1)
    at = _input_sample(sr)
    segs, keep = [], 0
    while True:
        start = (keep - warm) // unit * unit if keep else 0
        stop = start + hops * hop - unit  # its last hop's end, less a unit: a multiple of unit
        if stop + lo >= frames:  # the rest is short: this one goes to the end
            start = (keep - warm) // hop * hop if keep else 0
            return [*segs, Segment(signal, at(max(start, 0)), at(keep), n, n)]
        segs.append(Segment(signal, at(start), at(keep), at(stop), min(at(stop + unit + tail), n)))
        keep = stop


def _input_sample(sr: int):
    """Frame index (a multiple of `plan`'s unit) -> the input sample where it starts."""
    return lambda frame: frame * HOP * sr // SR


def upscale_signals(up: Upscaler, signals: list[Signal], rows: int = 1, workers: int = 1) -> list[np.ndarray]:
    """Each signal's 48 kHz output, as one stream over it alone gives it (the same bits), the
    hops of all of them batched: each signal cut into about `rows` segments, their streams split
    over `workers` threads (each stream's hops batched with those of its thread's others)."""
    outs: list[np.ndarray | None] = []
    jobs: list[tuple[Segment, Signal, Band]] = []
    for i, (sig, band) in enumerate(zip(signals, _bands(signals, workers), strict=True)):
        x = np.ascontiguousarray(sig.x, np.float32)
        if band.full or not x.any():  # only resampled; digital silence stays zeros
            outs.append(resample(x, sig.sr) if band.full else np.zeros((round(len(x) * SR / sig.sr), x.shape[1]),
                                                                          np.float32))
            continue
        outs.append(None)
        jobs += [(seg, sig, band) for seg in plan(i, len(x), sig.sr, up, rows)]
    groups = [jobs[k::workers] for k in range(workers) if jobs[k::workers]]
    if len(groups) > 1:
        with ThreadPoolExecutor(len(groups)) as pool:
            done = [part for parts in pool.map(lambda g: _run_all(up, g), groups) for part in parts]
    else:
        done = _run_all(up, jobs)
    for i, out in enumerate(outs):
        if out is None:
            outs[i] = np.concatenate([y for seg, y in sorted(done, key=lambda d: d[0].keep) if seg.signal == i])
    return outs


def _bands(signals: list[Signal], workers: int) -> list[Band]:
    """Each signal's band: given, or scanned, the scans of several signals on `workers` threads (the
    scans are much of the host's work on a batch of files, and their kernels release the GIL)."""
    todo = [sig for sig in signals if sig.band is None]
    if len(todo) > 1 and workers > 1:
        with ThreadPoolExecutor(min(workers, len(todo))) as pool:
            found = iter(list(pool.map(lambda sig: scan_band(sig.x, sig.sr), todo)))
    else:
        found = (scan_band(sig.x, sig.sr) for sig in todo)
    return [sig.band or next(found) for sig in signals]


def _run_all(up: Upscaler, jobs: list[tuple[Segment, Signal, Band]]) -> list[tuple[Segment, np.ndarray]]:
    """`_run` on all the jobs at once, or on a CPU a few at a time (CPU_CALL_FRAMES): a model
    call of many rows is slower a frame there (its activations leave the caches)."""
    per_call = CPU_CALL_FRAMES * HOP * 1000 // round(OFFLINE_HOP_MS * SR) if up.model.device == "cpu" else len(jobs)
    per_call = max(per_call, 1)
    return [part for k in range(0, len(jobs), per_call) for part in _run(up, jobs[k:k + per_call])]


def _run(up: Upscaler, jobs: list[tuple[Segment, Signal, Band]]) -> list[tuple[Segment, np.ndarray]]:
    """Every segment's stream fed block by block, all their hops in `step`'s batched rounds, then
    flushed; each segment's kept samples."""
    streams = [Stream(up.model, sig.sr, sig.x.shape[1], OFFLINE_HOP_MS, up.seed, band, sig.fill_holes)
               for _, sig, band in jobs]
    got: list[list[np.ndarray]] = [[] for _ in jobs]
    longest = max((seg.end - seg.start for seg, *_ in jobs), default=0)
    for i in range(0, longest, OFFLINE_BLOCK):
        live = [k for k, (seg, *_) in enumerate(jobs) if i < seg.end - seg.start]
        for k in live:
            seg, sig = jobs[k][:2]
            streams[k].push(sig.x[seg.start + i:min(seg.start + i + OFFLINE_BLOCK, seg.end)])
        for k, y in zip(live, step([streams[k] for k in live]), strict=True):
            got[k].append(y)
    for s, g in zip(streams, got, strict=True):  # alone: a short last hop's bits depend on its batch
        g.append(s.flush())
    return [(seg, seg.kept(np.concatenate(g), sig.sr)) for (seg, sig, _), g in zip(jobs, got, strict=True)]
