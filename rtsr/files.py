"""One file's upscale, wherever it runs: in the `rtsr upscale` process, or on a Dask worker.

The batch around it (planning outputs, progress, the report) is `rtsr.upscale_batch`'s; distributing it is
`rtsr.cluster`'s. Both call `upscale_audio` for the work itself, so a file upscaled on a cluster is
the same as one upscaled locally.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import numpy as np

from rtsr.audio_io import STDIO, AudioError, AudioReader, AudioWriter, check_writable
from rtsr.cutoff import Band, as_band, scan_band_blocks
from rtsr.features import SR
from rtsr.upscaler import OFFLINE_BLOCK, Upscaler

PASSTHROUGH_NOTE = "full band: resampled, nothing generated"
HOLES_NOTE = "lossy input: its codec's holes below the band filled"
LEVEL_JUMP_DB = 6.0  # an output this much louder (RMS) than its input is flagged...
AUDIBLE_DBFS = -90.0  # ...if it is above 16-bit's last bit: a silent file's generated hiss is not a jump


MAX_OFFLINE_WORKERS = 8  # more threads than this share one model bank's locks for little gain


@dataclass(frozen=True)
class LoadOptions:
    """How to load the model for a batch: the same on every machine that runs part of it."""

    model: str = "basic"
    device: str = "auto"
    steps: int | None = None
    seed: int = 0
    backend: str = "auto"
    threads: int = 1
    workers: int = 1

    @classmethod
    def of(cls, args: argparse.Namespace) -> LoadOptions:
        """The command's options; --workers unset: the machine's cores here, one on each Dask worker
        (the cluster runs a file per worker process already)."""
        workers = args.workers or (1 if args.scheduler else offline_workers())
        return cls(args.model, args.device, args.steps, args.seed, args.backend, args.threads, workers)


@dataclass(frozen=True)
class BandChoice:
    """What the user said of every file's band: its cutoff (None: each file is scanned for it), and
    whether a lossy file's codec holes are kept as they are instead of filled."""

    cutoff_hz: float | None = None
    keep_holes: bool = False

    @classmethod
    def of(cls, args: argparse.Namespace) -> BandChoice:
        return cls(args.cutoff, args.keep_holes)

    def fill_holes(self, lossy: bool) -> bool:
        return lossy and not self.keep_holes


def offline_workers() -> int:
    """Threads an offline upscale runs a signal's segments on by default: the machine's cores (at most
    MAX_OFFLINE_WORKERS). Segments are coarse work, one model thread each: on an idle 2-core VM two
    were 1.4-1.5x one (rtsr bench throughput, benchmarks/RESULTS.md)."""
    return max(1, min(os.cpu_count() or 1, MAX_OFFLINE_WORKERS))


def load_upscaler(opts: LoadOptions) -> Upscaler:
    """The model as these options say; ModelError/RuntimeError on failure."""
    return Upscaler.load(opts.model, opts.device, opts.steps, opts.seed, opts.backend, max(opts.threads, 1),
                         workers=max(opts.workers, 1))


@dataclass
class Job:
    """One input file and its output path, or the reason it cannot be planned."""

    src: Path
    dest: Path | None = None
    error: str | None = None
    root: Path | None = None  # the folder it was found under
    skip: bool = False  # its output exists already (and no --overwrite)


@dataclass
class Result:
    """One file's outcome: a line of the report and an entry of --json."""

    input: str
    output: str | None = None
    sr_in: int | None = None
    seconds: float | None = None  # input duration
    channels: int | None = None
    status: str = "failed"  # upscaled | resampled | skipped (output there already) | failed
    error: str | None = None
    cutoff_hz: float | None = None  # where the input's band ends: the output is the input below it
    band: str | None = None  # who says so: detected | rate (its Nyquist) | given
    holes_filled: bool = False  # a lossy input's codec holes below its band edge were filled
    warning: str | None = None  # e.g. an output much louder than its input
    compute_s: float | None = None
    clipped: int = 0  # samples clipped to fit 24-bit flac

    def line(self) -> str:
        if self.status == "failed":
            return f"FAILED {self.input}: {self.error}"
        if self.status == "skipped":
            return f"skipped {self.input}: {self.output} exists (--overwrite replaces it)"
        notes = [f"{self.sr_in} Hz, {self.channels} ch, {self.seconds:.2f} s, {self.compute_s:.2f} s compute",
                 f"band {self.cutoff_hz / 1000:.2f} kHz ({self.band})"]
        if self.status == "resampled":
            notes.append(PASSTHROUGH_NOTE)
        if self.holes_filled:
            notes.append(HOLES_NOTE)
        if self.warning:
            notes.append(f"WARNING: {self.warning}")
        if self.clipped:
            notes.append(f"{self.clipped} samples clipped to fit 24-bit flac")
        return f"{self.input} -> {self.output} ({'; '.join(notes)})"

    def done(self, band: Band, fill_holes: bool) -> None:
        """The upscale succeeded with this band (a full one is only resampled; nothing is filled)."""
        self.status, self.error = ("resampled" if band.full else "upscaled"), None
        self.holes_filled = fill_holes and not band.full

    def done_whole(self, x: np.ndarray, y: np.ndarray, band: Band, fill_holes: bool) -> None:
        """`done` for a signal upscaled whole (x -> y), with its level warning."""
        level = Level()
        level.input(x)
        level.output(y)
        self.warning = level.warning()
        self.done(band, fill_holes)


def upscale_file(up: Upscaler, job: Job, fmt: str, choice: BandChoice, overwrite: bool,
                 progress: Callable[[float], None] | None = None) -> Result:
    """Read, upscale, write one file in blocks (bounded memory whatever its length: the file is read
    twice, once for its band, once to upscale); any failure becomes the result's error, so a batch
    goes on."""
    res = Result(str(job.src), str(job.dest) if job.dest else None, error=job.error)
    if job.dest is None:
        return res
    if job.skip:
        res.status, res.error = "skipped", None
        return res
    try:
        check_destination(job.dest, overwrite)  # before the compute it would waste
        src = AudioReader(job.src)
        res.sr_in, res.channels, res.seconds = src.sr, src.channels, src.frames / src.sr
        t0 = perf_counter()
        band = as_band(choice.cutoff_hz, src.sr) or scan_band_blocks(src.blocks(OFFLINE_BLOCK), src.sr, src.channels)
        res.cutoff_hz, res.band = round(band.hz, 1), band.source
        fill = choice.fill_holes(src.lossy)
        level = Level()
        with AudioWriter(job.dest, SR, src.channels, fmt, overwrite, round(src.frames * SR / src.sr)) as out:
            for y in up.upscale_blocks(level.counting_input(src.blocks(OFFLINE_BLOCK)), src.sr, src.channels, band,
                                       fill):
                level.output(y)
                out.write(y)
                if progress is not None:
                    progress(len(y) / SR)
            out.commit()
        res.compute_s = perf_counter() - t0
        res.clipped, res.warning = out.clipped, level.warning()
        res.done(band, fill)
    except AudioError as e:
        res.status, res.error = "failed", e.reason if e.path == job.src else str(e)
    except (ValueError, RuntimeError, MemoryError, OSError) as e:  # engine refusals, CUDA OOM, disk errors
        res.status, res.error = "failed", in_words(e)
    return res


def in_words(e: Exception) -> str:
    """A failure as its user reads it: the engine's refusals are written for them ("cutoff 8001 Hz
    is above the input's Nyquist"); a class name ("ValueError: ...") says nothing more to them."""
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def check_destination(dest: Path, overwrite: bool) -> None:
    """Before any compute: the output may be written (exists only with --overwrite; its folder
    exists or can be made, and is writable); standard output ("-") always may."""
    if dest == STDIO:
        return
    check_writable(dest, overwrite)
    folder = dest.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise AudioError(dest, f"cannot make its folder: {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AudioError(dest, f"cannot write into {folder} (no permission)")
    dest.parent.mkdir(parents=True, exist_ok=True)


def upscale_audio(up: Upscaler, x: np.ndarray, sr: int, lossy: bool, choice: BandChoice,
                  res: Result) -> np.ndarray | None:
    """Upscale decoded audio (lossy: decoded from a lossy codec), filling in res (band, timing,
    level warning, status); engine refusals (ValueError, RuntimeError such as CUDA out of memory)
    become res.error and return None."""
    res.sr_in, res.channels, res.seconds = sr, x.shape[1], len(x) / sr
    try:
        t0 = perf_counter()
        band = as_band(choice.cutoff_hz, sr) or up.find_band(x, sr)
        res.cutoff_hz, res.band = round(band.hz, 1), band.source
        fill = choice.fill_holes(lossy)
        y = up.upscale(x, sr, cutoff=band, fill_holes=fill)
        res.compute_s = perf_counter() - t0
    except (ValueError, RuntimeError, MemoryError) as e:
        res.status, res.error = "failed", in_words(e)
        return None
    res.done_whole(x, y, band, fill)
    return y


class Level:
    """Input and output RMS accumulated block by block, for the level warning."""

    def __init__(self) -> None:
        self.inp = self.out = 0.0
        self.n_in = self.n_out = 0

    def input(self, x: np.ndarray) -> None:
        self.inp += float(np.square(x, dtype=np.float64).sum())
        self.n_in += x.size

    def counting_input(self, blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for b in blocks:
            self.input(b)
            yield b

    def output(self, y: np.ndarray) -> None:
        self.out += float(np.square(y, dtype=np.float64).sum())
        self.n_out += y.size

    def warning(self) -> str | None:
        """A note when the output's RMS is far above the input's (a cutoff set far too low, say)."""
        rms_in, rms_out = math.sqrt(self.inp / max(self.n_in, 1)), math.sqrt(self.out / max(self.n_out, 1))
        if rms_out <= 10 ** (AUDIBLE_DBFS / 20) or rms_out <= rms_in * 10 ** (LEVEL_JUMP_DB / 20):
            return None
        gain = 20 * math.log10(rms_out / max(rms_in, 1e-12))
        return f"output is {gain:.1f} dB louder than the input (RMS); check --cutoff"
