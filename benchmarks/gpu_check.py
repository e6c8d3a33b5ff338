"""The GPU check (issue 6): one script, under 6 minutes, printing a short table last.

    python benchmarks/gpu_check.py            # on the GPU machine
    python benchmarks/gpu_check.py --quick --device cpu   # a dry run of the same code here

On the GPU machine, run it through benchmarks/device_check.sh, which first installs the packages
its image lacks (soundfile, pyzmq: wheels carried in .whl/, made here by
benchmarks/device_wheels.sh) and rtsr, then runs the tests that need CUDA (the backends and the
bank against the CPU, the graphs really captured), then this script.

Measures, for each backend (eager, cudagraph, compile-cudagraph, compile, tensorrt): GPU output vs the CPU eager output
(relative error), offline throughput (x real time) for one file and for a batch of files (as
`rtsr upscale` runs them: bands found, segments on the machine's cores up to 8 threads), and
live-style per-hop latency p50/p99 at 20 ms hops for 1, 16, 64 and 256 concurrent streams batched
into one model call per hop, over a stream's first 1.2 s (its band tracker deciding, the host's
heaviest rounds) and, for 256 streams, over the rounds after its band has settled (most of a
call), also with each round's streams stepped in 4 random parts (a server's polls: a part runs a
graph of its own bucket), with the largest count whose p99 stays under the hop in the first phase, and one stream's
real-time factor (its round's p50 over the 20 ms it upscales, in both phases). First, the
host's glue per stream per 20 ms round with the model stubbed (benchmarks/glue_bench.py), the
part of a live round that no device removes, and what `rtsr serve`'s protocol adds to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import glue_bench  # beside this script
import numpy as np
import torch

from rtsr import batch
from rtsr.backends import BACKENDS, apply_backend
from rtsr.files import offline_workers
from rtsr.model import load_model
from rtsr.offline import Signal, upscale_signals
from rtsr.report import markdown_table
from rtsr.upscaler import Upscaler

SR_IN = 16000
# the device's own backends first, the one the bar rests on (a graph per hop) and the same graphs
# over compiled networks before compile alone, whose first compiles take minutes where they go
# wrong and whose hops an H200 ran 10-25x slower than eager; a backend that cannot run here says so at once
ORDER = ("eager", "cudagraph", "compile-cudagraph", "compile", "tensorrt", "onnx", "onnx-int8")
assert sorted(ORDER) == sorted(BACKENDS[1:])


def signal_(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR_IN * seconds)) / SR_IN
    return (0.1 * np.sin(2 * np.pi * 200 * t * (1 + 0.3 * np.sin(t))) + 0.02 * rng.standard_normal(len(t))
            ).astype(np.float32)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def offline(model, device: str, files: int, seconds: float) -> float:
    """x real time for `files` files of `seconds` each, as `rtsr upscale` runs a batch of files
    (rtsr.offline): bands found, cut into segments, hops batched, on `offline_workers()` threads."""
    xs = [signal_(seconds, k)[:, None] for k in range(files)]
    workers = offline_workers()
    up = Upscaler(model, workers=workers)
    sync(device)
    t0 = time.perf_counter()
    upscale_signals(up, [Signal(x, SR_IN) for x in xs], rows=workers, workers=workers)
    sync(device)
    return files * seconds / (time.perf_counter() - t0)


DECIDING = slice(5, 60)  # rounds timed from a stream's start (the first compile or capture): its band tracker deciding
SETTLED_FROM = 80  # rounds after its first decision (~1.4 s), the band settled: most of a live call
WAVES = 4  # a server's polls in a round, each finding some streams' blocks


def live(model, device: str, n: int, hops: int, waves: int = 1) -> dict[str, tuple[float, float]]:
    """p50/p99 ms of one 20 ms round for n streams (push one block each, one batched model call, or
    `waves` calls for random parts of them, as a server's polls find them): over the rounds while
    the streams' band trackers decide and, when `hops` reaches past SETTLED_FROM, over the rounds
    after it."""
    block = SR_IN // 50
    x = signal_(hops * 0.02 + 0.1, 0)
    streams = [Upscaler(model, k).stream(SR_IN, 1, 20.0) for k in range(n)]
    order = np.random.default_rng(0)
    times = []
    for h in range(hops):
        sync(device)
        t0 = time.perf_counter()
        for s in streams:
            s.push(x[h * block:(h + 1) * block])
        for part in np.array_split(order.permutation(n), waves):
            batch.step([streams[k] for k in part])
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = 1000 * np.array(times)
    phases = {"deciding": ms[DECIDING], "settled": ms[SETTLED_FROM:]}
    return {k: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for k, v in phases.items() if len(v)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="basic")
    p.add_argument("--quick", action="store_true", help="small sizes: a dry run of the code path")
    p.add_argument("--budget-s", type=float, default=330.0)
    p.add_argument("--backends", default=",".join(ORDER), help="comma list (default: all)")
    a = p.parse_args()
    start = time.time()
    torch.set_num_threads(4)
    counts = (1, 2) if a.quick else (1, 16, 64, 256)
    hops, secs, files = (12, 2.0, 2) if a.quick else (SETTLED_FROM + 60, 30.0, 16)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"device {name}, torch {torch.__version__}", flush=True)
    glue = {n: glue_bench.rounds(n, 10 if a.quick else 50, 100) for n in ((2,) if a.quick else (32, 256))}
    served = glue_bench.service_rounds(2 if a.quick else 256, 10 if a.quick else 50, 100)
    print(json.dumps({"glue": glue, "service": served}), flush=True)
    x = signal_(3.0, 1)
    ref = Upscaler(load_model(a.model, "cpu")).upscale(x, SR_IN)
    rows = []
    for backend in a.backends.split(","):
        row = {"backend": backend}
        rows.append(row)
        if time.time() - start > a.budget_s:
            row["status"] = "skipped: time budget"
            continue
        try:
            model = load_model(a.model, a.device)
            row["status"] = apply_backend(model, backend)
            y = Upscaler(model).upscale(x, SR_IN)
            row["rel_err_vs_cpu"] = float(np.abs(y - ref).max() / np.abs(ref).max())
            for n in (1, files):  # shapes compiled or captured before the timing (compile: minutes on a CPU)
                offline(model, a.device, n, 2.0)
            row["offline_x_rt_1file"] = offline(model, a.device, 1, secs)
            row["offline_x_rt_batch"] = offline(model, a.device, files, secs)
            for n in counts:
                if time.time() - start > a.budget_s:
                    break
                row[f"live_{n}"] = live(model, a.device, n, hops)
            if time.time() - start <= a.budget_s:
                row["live_waves"] = live(model, a.device, counts[-1], hops, WAVES)
            fits = [n for n in counts if f"live_{n}" in row and row[f"live_{n}"]["deciding"][1] < 20.0]
            row["streams_p99_under_20ms"] = max(fits, default=0)
        except Exception as e:  # report and go on: one backend failing must not hide the others
            row["status"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
        print(json.dumps(row), flush=True)
    most = counts[-1]
    header = ["backend", "status", "rel. err vs CPU", f"offline x RT (1 file / batch of {files})",
              *(f"p50/p99 ms, {n} streams" for n in counts), f"p50/p99 ms, {most} streams settled",
              f"... in {WAVES} polls a round", "streams with p99 < 20 ms", "one stream's RTF (settled)"]

    def cell(r: dict, n: int | str, phase: str) -> str:
        got = r.get(f"live_{n}", {}).get(phase)
        return "-" if got is None else "{:.2f} / {:.2f}".format(*got)

    def rtf(r: dict, phase: str) -> str:  # a lone stream's round (p50) over the 20 ms it upscales
        got = r.get("live_1", {}).get(phase)
        return "-" if got is None else f"{got[0] / 20:.3f}"

    table = [[r["backend"], r["status"], f"{r.get('rel_err_vs_cpu', float('nan')):.1e}",
              f"{r.get('offline_x_rt_1file', 0):.0f} / {r.get('offline_x_rt_batch', 0):.0f}",
              *(cell(r, n, "deciding") for n in counts), cell(r, most, "settled"), cell(r, "waves", "settled"),
              str(r.get("streams_p99_under_20ms", "-")),
              f"{rtf(r, 'deciding')} ({rtf(r, 'settled')})"]
             for r in rows]
    print("\n" + "\n".join(markdown_table(header, table)))
    print("\nhost glue, model stubbed: " + "; ".join(
        f"{n} streams {g['us_per_stream_round']} us per stream per round ("
        + ", ".join(f"{k} {v}" for k, v in g["stages_us_per_stream_round"].items()) + ")" for n, g in glue.items()))
    print(f"serve's protocol (socket-free), {served['streams']} streams: {served['protocol_us_per_stream_round']} us "
          f"per stream per round over the engine's {served['engine_us_per_stream_round']}")
    print(f"\ntotal {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
