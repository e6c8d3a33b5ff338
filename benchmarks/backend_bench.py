"""Eager vs ONNX Runtime side by side, in one process: the same stream, hop by hop, interleaved.

This VM's speed moves +-2x from minute to minute, so the two backends are timed alternately on
the same hops (eager hop k, then onnx hop k) and compared as a ratio. Reported: per-hop time of
the whole engine step (resampler, features, sampler, vocoder, iSTFT, merge) and of the model
call alone, the worst hop, and the largest difference between the two outputs relative to the peak.

    python benchmarks/backend_bench.py --model basic --seconds 30 --hop-ms 20
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from rtsr.bench import machine, machine_line, speech_like
from rtsr.upscaler import Upscaler


def timed_model(up: Upscaler) -> list[float]:
    """Record the time of every model call (the hop's sampler, mel merge and vocoder: what a
    backend replaces; ONNX runs it as one graph), seconds per call."""
    spent: list[float] = []
    run = up.model.run

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = run(*a, **k)
        spent.append(time.perf_counter() - t0)
        return out
    up.model.run = timed
    return spent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="basic")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--input-sr", type=int, default=16000)
    p.add_argument("--hop-ms", type=float, default=20.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    ups = {b: Upscaler.load(a.model, "cpu", backend=b, threads=1, warm_up=True) for b in ("eager", "onnx")}
    nets = {b: timed_model(up) for b, up in ups.items()}
    streams = {b: up.stream(a.input_sr, 1, a.hop_ms) for b, up in ups.items()}
    x = speech_like(a.input_sr, a.seconds)
    hop = round(a.input_sr * a.hop_ms / 1000)
    hops: dict[str, list[float]] = {b: [] for b in ups}
    outs: dict[str, list[np.ndarray]] = {b: [] for b in ups}
    for i in range(0, len(x), hop):
        for b, s in streams.items():
            t0 = time.perf_counter()
            outs[b].append(s.feed(x[i:i + hop]))
            hops[b].append(time.perf_counter() - t0)
    ya, yb = (np.concatenate(outs[b]) for b in ("eager", "onnx"))
    n = len(hops["eager"])
    report = {"machine": machine_line(machine("cpu")), "model": a.model, "hop_ms": a.hop_ms, "hops": n,
              "max_rel_diff": float(np.abs(ya - yb).max() / np.abs(ya).max())}
    for b in ups:
        report[b] = {"hop_ms_mean": 1000 * float(np.mean(hops[b])), "hop_ms_max": 1000 * float(np.max(hops[b])),
                     "model_ms_per_hop": 1000 * float(np.sum(nets[b])) / n}
    report["ratio_hop"] = report["onnx"]["hop_ms_mean"] / report["eager"]["hop_ms_mean"]
    report["ratio_model"] = report["onnx"]["model_ms_per_hop"] / report["eager"]["model_ms_per_hop"]
    if a.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['machine']}\nmodel {a.model}, {n} hops of {a.hop_ms:g} ms at {a.input_sr} Hz, torch "
          f"{torch.__version__}; outputs differ by at most {report['max_rel_diff']:.1e} of the peak")
    for b in ups:
        r = report[b]
        print(f"{b:6s} per hop {r['hop_ms_mean']:.2f} ms (worst {r['hop_ms_max']:.1f}), model "
              f"{r['model_ms_per_hop']:.2f} ms")
    print(f"onnx / eager: whole hop {report['ratio_hop']:.2f}, model {report['ratio_model']:.2f}")


if __name__ == "__main__":
    main()
