"""Offline batches on a Dask cluster: `rtsr upscale ... --scheduler ADDRESS` (or `local:N`).

Dask's `distributed` scheduler does the distributing: it places each file's task on a worker,
and re-runs the tasks of a worker that dies on the others. How files reach workers: **the client
sends each input's bytes and gets the output samples back**, so workers on other hosts need no
shared storage, only the rtsr package and its models; outputs are written by the client, through
the same atomic writer as a local run, and equal a local run's (same model, seed and code).
Each worker process loads the model once (a per-process cache keyed by the load options) with
the client's device/backend/threads options. At most a few files per worker are in flight, so a
batch of thousands does not sit in the client's memory.

    dask scheduler                                 # host A (prints tcp://A:8786)
    dask worker tcp://A:8786 --nthreads 1          # each worker host, once per core
    rtsr upscale -il list.txt -o out/ --scheduler tcp://A:8786
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import cache

import numpy as np

from rtsr.audio_io import STDIO, AudioError, decode_audio, stdin_copy, write_audio
from rtsr.features import SR
from rtsr.files import BandChoice, Job, LoadOptions, Result, load_upscaler, upscale_audio

IN_FLIGHT_PER_WORKER = 2


@cache
def _worker_upscaler(opts: LoadOptions):
    """The model, loaded once per worker process for these options."""
    return load_upscaler(opts)


def upscale_bytes(data: bytes, name: str, opts: LoadOptions, choice: BandChoice) -> tuple[dict, np.ndarray | None]:
    """A worker's task: decode an input's bytes, upscale, return (result fields, 48 kHz samples)."""
    res = Result(name)
    try:
        x, sr, lossy = decode_audio(io.BytesIO(data), name)
    except AudioError as e:
        res.error = e.reason
        return asdict(res), None
    y = upscale_audio(_worker_upscaler(opts), x, sr, lossy, choice, res)
    return asdict(res), y


@contextmanager
def connect(address: str) -> Iterator:
    """A Dask client: `local:N` starts a local cluster of N single-threaded worker processes."""
    from distributed import Client, LocalCluster

    if address.startswith("local:"):
        n = int(address.split(":", 1)[1])
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            yield client
    else:
        with Client(address, timeout="10s") as client:
            yield client


def run_on_cluster(address: str, jobs: list[Job], opts: LoadOptions, fmt: str, choice: BandChoice,
                   overwrite: bool, report: Callable[[Result], None]) -> list[Result]:
    """Every job's Result in job order; report() sees each as it finishes (for progress lines)."""
    from distributed import as_completed

    results: dict[int, Result] = {}
    todo = []
    for i, job in enumerate(jobs):
        if job.dest is None or job.skip:
            results[i] = Result(str(job.src), str(job.dest) if job.dest else None, error=job.error,
                                status="skipped" if job.skip else "failed")
            report(results[i])
        else:
            todo.append(i)
    with connect(address) as client:
        window = max(IN_FLIGHT_PER_WORKER * max(len(client.scheduler_info()["workers"]), 1), 2)
        pending = iter(todo)
        ac = as_completed()
        index_of: dict[str, int] = {}

        def submit_next() -> None:
            i = next(pending, None)
            if i is None:
                return
            try:
                data = (stdin_copy() if jobs[i].src == STDIO else jobs[i].src).read_bytes()
            except OSError as e:
                results[i] = Result(str(jobs[i].src), str(jobs[i].dest), error=f"cannot read it: {e.strerror or e}")
                report(results[i])
                submit_next()
                return
            fut = client.submit(upscale_bytes, data, str(jobs[i].src), opts, choice, pure=False)
            index_of[fut.key] = i
            ac.add(fut)

        for _ in range(window):
            submit_next()
        for fut in ac:
            i = index_of.pop(fut.key)
            results[i] = _finish(fut, jobs[i], fmt, overwrite)
            report(results[i])
            submit_next()
    return [results[i] for i in range(len(jobs))]


def _finish(fut, job: Job, fmt: str, overwrite: bool) -> Result:
    """Write a finished task's output locally; a task that failed on every worker is that file's error."""
    try:
        fields, y = fut.result()
    except Exception as e:  # e.g. KilledWorker after Dask's allowed retries: that file fails, the batch goes on
        return Result(str(job.src), str(job.dest), error=f"{type(e).__name__}: {e}")
    res = Result(**{**fields, "input": str(job.src), "output": str(job.dest)})
    if y is None:
        return res
    try:
        job.dest.parent.mkdir(parents=True, exist_ok=True)
        res.clipped = write_audio(job.dest, y, SR, fmt, overwrite)
    except (AudioError, OSError) as e:
        res.status, res.error = "failed", str(e)
    return res
