"""`rtsr bench`: latency, speed and quality on this machine, measured the way they are used.

    rtsr bench latency --input-sr 16000 --hop-ms 20 [--streams 8]   # live: per-block time, deadlines
    rtsr bench throughput --seconds 30                              # offline: x real time, peak RSS
    rtsr bench quality --eval ../shared/eval-dev                    # LSD next to sinc and naive
    rtsr bench band [--eval ../shared/eval-dev]                     # band-edge detector: hits, false edges

Latency is given twice: computed from the parameters (`Stream.latency_samples`) and measured by
pushing impulses through a stream one input sample at a time, so a mistake in either shows up as
a difference. Blocks are timed twice too: back to back (how many streams one process can carry),
and one stream fed each block when it is due, as a sound card delivers it (what `rtsr live` runs
at: between blocks other work evicts the model's weights from the caches, so on a busy machine a
paced block costs more). Every report says which CPU, GPU and thread count produced it: numbers
from a shared or differently threaded machine are not comparable.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import sys
from pathlib import Path
from time import perf_counter, sleep

import numpy as np
import torch

from rtsr.audio_io import AudioError, read_audio
from rtsr.backends import BACKENDS
from rtsr.bench_band import add_band_parser, band_report, render_band
from rtsr.bench_quality import add_quality_parser, quality_report, render_quality
from rtsr.cli import device_name, positive_int
from rtsr.engine import Stream
from rtsr.features import HOP, SR
from rtsr.files import offline_workers
from rtsr.model import ModelError
from rtsr.report import markdown_table
from rtsr.upscaler import Upscaler

IMPULSE = 0.5
# throughput's warm-up is long enough to be cut for two workers and to run 2 s hops (each worker
# thread's first call and each new hop shape cost once): what a batch of files runs at
THROUGHPUT_WARMUP_S = 20.0
MAX_STREAMS = 1024

Report = dict


# --- the machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(n: int = 512, reps: int = 50) -> float:
    """Speed of a fixed float32 matrix product on the CPU threads in use: a shared or throttled
    machine changes speed from run to run (measured here: ±20 % and more), so each report carries
    this yardstick beside its timings."""
    a = torch.randn(n, n)
    a @ a
    t0 = perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n ** 3 * reps / (perf_counter() - t0) / 1e9


def machine(device: str) -> dict:
    """What produced the numbers: CPU, cores, torch threads, GPU, load, and the CPU's speed now."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": device,
            "gpu": gpu, "torch": torch.__version__, "load_avg_1min": round(os.getloadavg()[0], 2),
            "matmul_gflops": round(matmul_gflops(), 1)}


def machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch thread{'s' * (m['threads'] != 1)}, "
            f"device {m['device']}, GPU {m['gpu'] or 'none'}, load average {m['load_avg_1min']}, "
            f"512x512 float32 matmul {m['matmul_gflops']:g} GFLOP/s (the CPU's speed at the time)")


# --- signals ------------------------------------------------------------------------------------


def speech_like(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like (frames, 1) test input: a harmonic voice whose pitch glides 100-250 Hz, in 4 Hz
    syllables, plus a little noise for the unvoiced band; peak below 0.3."""
    t = np.arange(round(sr * seconds)) / sr
    f0 = 175 + 75 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    harmonics = range(1, int(sr / 2 / 250))
    voice = sum(np.sin(k * phase) / k for k in harmonics)
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.1 * syllables * voice + 0.01 * noise).astype(np.float32)[:, None]


def bench_input(args: argparse.Namespace, default_s: float) -> tuple[np.ndarray, int, str]:
    """(frames, channels), rate and a description: --file (its own rate, first --seconds) or the test signal."""
    if args.file is None:
        seconds = args.seconds or default_s
        return speech_like(args.input_sr, seconds), args.input_sr, f"{seconds:g} s test signal"
    x, sr = read_audio(args.file)
    if args.seconds:
        x = x[: round(sr * args.seconds)]
    return x, sr, f"{args.file} ({len(x) / sr:.2f} s, {x.shape[1]} ch)"


# --- latency ------------------------------------------------------------------------------------


def handouts(stream: Stream, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feed x one sample at a time, as the tightest live callback would; returns the output and,
    for each output sample, the index of the input sample whose arrival handed it out."""
    out, at = [], []
    for i in range(len(x)):
        y = stream.feed(x[i:i + 1])
        out.append(y)
        at += [i] * len(y)
    return np.concatenate(out), np.array(at)


def impulse_positions(upscaler: Upscaler, sr: int, hop_ms: float, n: int) -> list[int]:
    """Input positions whose output waits longest and shortest, found from the handout schedule.

    The first sample of each handed-out block waits longest (a whole hop), the last shortest; the
    schedule does not depend on the signal, so it is read off a stream fed silence. Impulses go at
    the start of block 1, the end of block 2, the start of block 4 and the middle of block 5: at
    least a hop apart, so each peak is found on its own.
    """
    _, at = handouts(upscaler.stream(sr, 1, hop_ms), np.zeros((n, 1), np.float32))
    starts = np.flatnonzero(np.diff(at, prepend=-1))  # output index of each block's first sample
    if len(starts) < 7:
        raise ValueError("latency probe too short for the hop")
    firsts, others = [starts[1], starts[4]], [starts[3] - 1, (starts[5] + starts[6]) // 2]
    # an input sample lands on output j * SR / sr: take the first at or after a block's first
    # output, and the last at or before the other outputs, so that each stays in its block
    return sorted([-(-int(j) * sr // SR) for j in firsts] + [int(j) * sr // SR for j in others])


def measure_latency(upscaler: Upscaler, sr: int, hop_ms: float) -> dict:
    """Impulse-measured delay from an input sample's arrival to the handout of its output peak."""
    probe = upscaler.stream(sr, 1, hop_ms)
    n = round(sr * (probe.latency_ms + 9 * hop_ms) / 1000)
    positions = impulse_positions(upscaler, sr, hop_ms, n)
    x = np.zeros((n, 1), np.float32)
    x[positions] = IMPULSE
    y, at = handouts(probe, x)
    half = probe.hop_frames * HOP // 2  # impulses are a hop or more apart
    delays, lags = [], []
    for p in positions:
        expect = round(p * SR / sr)
        lo = max(expect - half, 0)
        peak = lo + int(np.argmax(np.abs(y[lo:expect + half, 0])))
        delays.append(int(at[peak]) - p)  # input samples that arrived after p before the handout
        lags.append(peak - expect)
    to48 = SR / sr
    return {"computed_samples": probe.latency_samples, "computed_ms": probe.latency_ms,
            "measured_worst_samples": max(delays) * to48, "measured_worst_ms": 1000 * max(delays) / sr,
            "measured_best_ms": 1000 * min(delays) / sr, "impulse_positions": positions,
            "impulse_delays_in": delays, "peak_lags_48k": lags}


def time_rounds(streams: list[Stream], x: np.ndarray, block: int, pace_s: float = 0.0) -> np.ndarray:
    """Seconds per round, a round being every stream fed its next block in turn: a server's
    callback without batching. Only whole blocks, as a sound card delivers them; pace_s > 0: a
    round starts pace_s after the previous one was due (at once if that has passed), as in real time."""
    times, due = [], perf_counter()
    for i in range(0, len(x) - block + 1, block):
        if pace_s:
            sleep(max(due - perf_counter(), 0.0))
            due += pace_s
        t0 = perf_counter()
        for s in streams:
            s.feed(x[i:i + block])
        times.append(perf_counter() - t0)
    return np.array(times)


def block_stats(times: np.ndarray, hop_s: float, n_streams: int) -> dict:
    """Percentiles in ms, real-time factor per stream, and rounds slower than the hop (missed deadlines)."""
    ms = 1000 * times
    return {"streams": n_streams, "blocks": len(times),
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}, "max_ms": float(ms.max()),
            "rtf": float(times.sum() / (len(times) * hop_s) / n_streams),
            "deadline_misses": int((times > hop_s).sum())}


def stream_delta(up: Upscaler, x: np.ndarray, sr: int, hop_ms: float) -> float:
    """Max |streamed - offline| relative to the offline peak: the two paths must agree."""
    s, block = up.stream(sr, x.shape[1], hop_ms), round(sr * hop_ms / 1000)
    y = np.concatenate([s.feed(x[i:i + block]) for i in range(0, len(x), block)] + [s.flush()])
    ref = up.upscale(x, sr)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12))


def stream_counts(limit: int) -> list[int]:
    """1, 2, 4, ... up to limit, and limit itself."""
    counts = [1 << k for k in range(limit.bit_length()) if 1 << k < limit]
    return counts + [limit]


def latency_report(args: argparse.Namespace) -> Report:
    """Impulse latency, then per-block times for 1, 2, 4, ... streams until the p99 misses the hop."""
    up = load_upscaler(args)
    x, sr, what = bench_input(args, 10.0)
    block = round(sr * args.hop_ms / 1000)
    hop_s = block / sr
    up.warm_up(sr, x.shape[1], args.hop_ms)  # as `rtsr live` does before its stream
    latency = measure_latency(up, sr, args.hop_ms)
    rows = []
    for n in stream_counts(args.streams):
        runs = sorted((block_stats(time_rounds([Upscaler(up.model, seed).stream(sr, x.shape[1], args.hop_ms)
                                                for seed in range(n)], x, block), hop_s, n)
                       for _ in range(args.repeat)), key=lambda run: run["rtf"])
        rows.append({**runs[len(runs) // 2], "rtf_min": runs[0]["rtf"], "rtf_max": runs[-1]["rtf"]})
        if rows[-1]["p99_ms"] > 1000 * hop_s:
            break
    fits = [r["streams"] for r in rows if r["p99_ms"] <= 1000 * hop_s]
    paced = block_stats(time_rounds([up.stream(sr, x.shape[1], args.hop_ms)], x, block, hop_s), hop_s, 1)
    return {"command": "latency", "model": model_info(up), "input": what, "input_sr": sr, "hop_ms": args.hop_ms,
            "block_samples": block, "latency": latency, "streaming_vs_offline": stream_delta(up, x, sr, args.hop_ms),
            "repeat": args.repeat, "rows": rows, "max_streams_p99_under_hop": max(fits, default=0), "paced": paced}


def render_latency(r: Report) -> str:
    lat, m = r["latency"], r["model"]
    lines = [f"{model_line(m)}, input {r['input']} at {r['input_sr']} Hz, "
             f"hop {r['hop_ms']:g} ms = blocks of {r['block_samples']} samples",
             f"machine: {machine_line(r['machine'])}",
             f"latency computed: {lat['computed_samples']} samples at 48 kHz = {lat['computed_ms']:.2f} ms",
             f"latency measured (impulses, one input sample at a time): worst {lat['measured_worst_ms']:.2f} ms "
             f"({lat['measured_worst_samples']:g} samples at 48 kHz, in steps of one input sample = "
             f"{SR / r['input_sr']:g} output samples), best {lat['measured_best_ms']:.2f} ms",
             f"streaming vs offline: max relative delta {r['streaming_vs_offline']:.2e}",
             f"each row: the run with the median RTF of {r['repeat']} (min-max beside it; a shared or "
             "frequency-scaled machine varies from run to run)",
             ""]
    lines += markdown_table(
        ["streams", "blocks", "p50 ms", "p95 ms", "p99 ms", "max ms", "RTF per stream", "RTF min-max",
         "deadline misses"],
        [[s["streams"], s["blocks"], f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{s['p99_ms']:.2f}",
          f"{s['max_ms']:.2f}", f"{s['rtf']:.3f}", f"{s['rtf_min']:.3f}-{s['rtf_max']:.3f}", s["deadline_misses"]]
         for s in r["rows"]])
    lines += ["", f"most streams per process (of 1, 2, 4, ... tried, round-robin, no batching) whose p99 for all "
                  f"streams together stays under the {r['hop_ms']:g} ms hop: {r['max_streams_p99_under_hop']}"]
    p = r["paced"]
    lines += ["", f"1 stream fed in real time, a block every {r['hop_ms']:g} ms as a sound card delivers it "
                  f"(what `rtsr live` runs at): RTF {p['rtf']:.3f}, p50 {p['p50_ms']:.2f} ms, "
                  f"p99 {p['p99_ms']:.2f} ms, {p['deadline_misses']} deadline misses of {p['blocks']}"]
    return "\n".join(lines)


# --- throughput ---------------------------------------------------------------------------------


def throughput_report(args: argparse.Namespace) -> Report:
    """Offline `upscale` of the whole input once (after a warm-up on its first 20 s): speed and peak memory."""
    up = load_upscaler(args)
    up.workers = args.workers or offline_workers()
    x, sr, what = bench_input(args, 30.0)
    up.upscale(x[: round(sr * THROUGHPUT_WARMUP_S)], sr)
    t0 = perf_counter()
    up.upscale(x, sr)
    compute = perf_counter() - t0
    seconds = len(x) / sr
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"command": "throughput", "model": model_info(up), "input": what, "input_sr": sr, "workers": up.workers,
            "audio_s": seconds, "compute_s": compute, "x_real_time": seconds / compute,
            "peak_rss_mib": peak_kib / 1024}


def render_throughput(r: Report) -> str:
    m = r["model"]
    return "\n".join([
        f"{model_line(m)}, input {r['input']} at {r['input_sr']} Hz, offline upscale on "
        f"{r.get('workers', 1)} worker thread{'s' * (r.get('workers', 1) != 1)}",
        f"machine: {machine_line(r['machine'])}", "",
        *markdown_table(["audio s", "compute s", "x real time", "peak RSS MiB"],
                        [[f"{r['audio_s']:.1f}", f"{r['compute_s']:.2f}", f"{r['x_real_time']:.2f}",
                          f"{r['peak_rss_mib']:.0f}"]])])


# --- the command --------------------------------------------------------------------------------


def load_upscaler(args: argparse.Namespace) -> Upscaler:
    return Upscaler.load(args.model, args.device, args.steps, args.seed, args.backend, args.threads)


def model_info(up: Upscaler) -> dict:
    return {"name": up.model.name, "steps": up.model.steps, "device": up.model.device}


def model_line(m: dict) -> str:
    return f"model {m['name']} ({m['steps']} sampler step{'s' * (m['steps'] != 1)}, {m['device']})"


_positive_int = functools.partial(positive_int, most=MAX_STREAMS)


def _common(p: argparse.ArgumentParser, steps: bool = True) -> None:
    """Options every bench takes: which model, where, how many threads, and the output form."""
    p.add_argument("--model", default="basic", help="bundled model name or model folder (default: basic)")
    if steps:
        p.add_argument("--steps", type=_positive_int, metavar="N", help="sampler steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--device", type=device_name, default="cpu", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="network execution backend (default auto: the fastest that works here)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="torch CPU threads (default 1; oversubscribed threads are many times slower)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _signal_args(p: argparse.ArgumentParser, default_s: float) -> None:
    p.add_argument("--input-sr", type=int, default=16000, metavar="HZ", help="test signal rate (default 16000)")
    p.add_argument("--seconds", type=float, metavar="S",
                   help=f"test signal length, or the first S of --file (default {default_s:g} / the whole file)")
    p.add_argument("--file", type=Path, metavar="F", help="bench on this audio file, at its own rate")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="latency, throughput and quality on this machine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    lat = sub.add_parser("latency", help="live streaming: latency, per-block compute time, deadline misses")
    _signal_args(lat, 10.0)
    lat.add_argument("--hop-ms", type=float, default=20.0, metavar="MS", help="stream hop (default 20)")
    lat.add_argument("--streams", type=_positive_int, default=1, metavar="N",
                     help="run 1, 2, 4, ... up to N streams round-robin and report the most that keep "
                          "p99 under the hop (default 1)")
    lat.add_argument("--repeat", type=_positive_int, default=1, metavar="K",
                     help="time each stream count K times and report the median run (default 1)")
    _common(lat)
    lat.set_defaults(func=run_bench, bench_run=(latency_report, render_latency))
    thr = sub.add_parser("throughput", help="offline upscale speed and peak memory")
    _signal_args(thr, 30.0)
    thr.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                     help="threads the signal's segments run on (rtsr.offline; default: as rtsr upscale, the "
                          "machine's cores up to 8)")
    _common(thr)
    thr.set_defaults(func=run_bench, bench_run=(throughput_report, render_throughput))
    qual = add_quality_parser(sub)
    _common(qual, steps=False)
    qual.set_defaults(func=run_bench, bench_run=(quality_report, render_quality))
    band = add_band_parser(sub)
    band.set_defaults(func=run_bench, bench_run=(band_report, render_band))


def run_bench(args: argparse.Namespace) -> int:
    """Run one bench with the asked threads; a bad model, file or folder is reported with status 2."""
    torch.set_num_threads(args.threads)
    make, render = args.bench_run
    try:
        report = make(args)
    except (ModelError, AudioError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"rtsr bench {args.bench}: {e}", file=sys.stderr)
        return 2
    report["machine"] = machine(args.device)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0
