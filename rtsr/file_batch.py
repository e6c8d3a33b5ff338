"""`rtsr upscale`'s files as batches: decoded whole (and their band found from those samples) on
I/O threads while the model runs, upscaled a batch at a time (rtsr.offline: the hops of all
their segments batched per model call; a batch is what is decoded when the model is free, up to
BATCH_S), and written on those threads too.

Threads, not processes: reading, decoding (libsndfile, FFmpeg), the band scan's resampler and
FFTs and writing all run with the GIL released, and a thread costs nothing to start, where a
worker process took ~1-2 s of a 2-core machine to start and import its libraries (measured here:
a 2-minute batch of six files took 5.4-6.4 s with one, 3.4-4.3 s without).

Each output is the one the file gets alone (`Upscaler.upscale`, the same bits: rtsr.offline). A
file too long to hold whole (LONG_S), standard input and standard output go the block-by-block
way (rtsr.files.upscale_file), in bounded memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter

from rtsr.audio_io import STDIO, AudioError
from rtsr.batch_io import Decoded, decode_with_band, write_output
from rtsr.features import SR
from rtsr.files import BandChoice, Job, Result, check_destination, in_words, offline_workers, upscale_file
from rtsr.offline import Signal, upscale_signals
from rtsr.upscaler import Upscaler

BATCH_S = 300.0  # seconds of input upscaled together: ~100 MB of decoded 44.1 kHz stereo, outputs as much again
LONG_S = 600.0  # longer files go block by block, not held whole (10 min of 44.1 kHz stereo: ~0.5 GB in and out)
AHEAD = 4  # files decoded ahead of the model, per I/O thread


def io_threads() -> int:
    """I/O threads: one per two of the offline workers. One thread decodes and scans a 44.1 kHz
    stereo file at ~330-410x real time here, under what a GPU upscales; a 2-core machine keeps one."""
    return max(1, offline_workers() // 2)


def upscale_files(up: Upscaler, jobs: list[Job], seconds: dict[str, float], fmt: str, choice: BandChoice,
                  overwrite: bool, progress: Callable[[str, float], None],
                  report: Callable[[Result], None]) -> list[Result]:
    """Every job's Result in job order, each reported once final; `seconds`: each input's
    duration from its header (0: unknown), which decides the way it goes."""
    results: list[Result | None] = [None] * len(jobs)
    whole = [i for i, j in enumerate(jobs) if _whole(j, seconds.get(str(j.src), 0.0), overwrite)]
    threads = io_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="rtsr-io") as io:
        ahead = AHEAD * threads
        decoding = deque((i, io.submit(decode_with_band, jobs[i].src, choice.cutoff_hz)) for i in whole[:ahead])
        later = iter(whole[ahead:])
        batch: list[tuple[int, Decoded]] = []
        writes: list[tuple[int, Result, Future | None]] = []

        def run_batch() -> None:
            nonlocal writes, batch
            written, writes = writes, _upscale(up, jobs, batch, fmt, choice, overwrite, io, progress)
            _finish(written, results, report)  # the previous batch's writes, done meanwhile
            batch = []

        for i, job in enumerate(jobs):
            if not decoding or decoding[0][0] != i:
                results[i] = upscale_file(up, job, fmt, choice, overwrite, lambda s, src=str(job.src): progress(src, s))
                report(results[i])
                continue
            decoded = decoding.popleft()[1].result()
            if (nxt := next(later, None)) is not None:
                decoding.append((nxt, io.submit(decode_with_band, jobs[nxt].src, choice.cutoff_hz)))
            if decoded.error is not None:
                results[i] = Result(str(job.src), str(job.dest), error=decoded.error)
                report(results[i])
                continue
            batch.append((i, decoded))
            waiting = bool(decoding) and not decoding[0][1].done()  # rather than wait for it, run what is here
            if waiting or sum(len(d.x) / d.sr for _, d in batch) >= BATCH_S:
                run_batch()
        if batch:
            run_batch()
        _finish(writes, results, report)
    return results


def _whole(job: Job, seconds: float, overwrite: bool) -> bool:
    """Whether a job goes the batched way: a file of known length under LONG_S, from and to files;
    its output must be writable (checked before any compute, as upscale_file does)."""
    if job.dest is None or job.skip or STDIO in (job.src, job.dest) or not 0 < seconds <= LONG_S:
        return False
    try:
        check_destination(job.dest, overwrite)
    except (AudioError, OSError):
        return False  # upscale_file says why, in its words
    return True


def _upscale(up: Upscaler, jobs: list[Job], batch: list[tuple[int, Decoded]], fmt: str, choice: BandChoice,
             overwrite: bool, io: ThreadPoolExecutor, progress: Callable[[str, float], None],
             ) -> list[tuple[int, Result, Future]]:
    """Upscale a batch together; each output handed to the I/O threads to write. The compute time of the
    batch is shared among its files by duration."""
    signals = [Signal(d.x, d.sr, d.band, choice.fill_holes(d.lossy)) for _, d in batch]
    t0 = perf_counter()
    try:
        outs = upscale_signals(up, signals, rows=up.workers, workers=up.workers)
    except (ValueError, RuntimeError, MemoryError) as e:  # engine refusals, out of memory: the batch's files fail
        return [(i, Result(str(jobs[i].src), str(jobs[i].dest), error=in_words(e)), None) for i, _ in batch]
    per_s = (perf_counter() - t0) / sum(len(s.x) / s.sr for s in signals)
    writes = []
    for (i, d), sig, y in zip(batch, signals, outs, strict=True):
        res = Result(str(jobs[i].src), str(jobs[i].dest), d.sr, len(d.x) / d.sr, d.x.shape[1],
                     cutoff_hz=round(d.band.hz, 1), band=d.band.source, compute_s=per_s * len(d.x) / d.sr)
        res.done_whole(d.x, y, d.band, sig.fill_holes)
        progress(str(jobs[i].src), len(y) / SR)
        writes.append((i, res, io.submit(write_output, jobs[i].dest, y, SR, fmt, overwrite)))
    return writes


def _finish(writes: list[tuple[int, Result, Future | None]], results: list[Result | None],
            report: Callable[[Result], None]) -> None:
    """Wait for a batch's writes; each file's result final (failed if its write failed)."""
    for i, res, fut in writes:
        if fut is not None:
            res.clipped, error = fut.result()
            if error is not None:
                res.status, res.error = "failed", error
        results[i] = res
        report(res)
