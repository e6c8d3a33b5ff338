"""Soak: N concurrent streams x S seconds through `rtsr serve` and through `rtsr broker` with two
workers (one of them killed mid-run), half the clients bursty and half paced: is anything lost?

Every service runs as its own process (as deployed, each with one torch thread). Each stream is a
`rtsr.client.Client` in its own thread sending a speech-like 16 kHz signal in 20 ms blocks:
*bursty* clients keep up to 10 blocks unanswered and send as fast as they are answered (a file
filter); *paced* ones send each block when its last sample would have arrived from a live source.
Both resend what they are told to (`busy`/`rate`, go-back-N). Reported per scenario: blocks sent,
resent and answered; streams whole (every block answered once, in order, and the output equal to
`Upscaler.upscale` of the input within 1e-4 of its peak); errors by code; each service process's
peak RSS, sampled every 0.5 s. In the broker scenario the second worker is SIGKILLed halfway:
its streams must end with `worker_lost` and every other stream must still be whole.

    python benchmarks/soak_bench.py --streams 64 --seconds 60 --model basic [--json]

Exit status: 0 when every stream is whole (or, on the killed worker, ended by `worker_lost`), 1 if not.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from serve_bench import Server

from rtsr.bench import machine, machine_line, speech_like
from rtsr.client import Client, ServerError
from rtsr.report import markdown_table
from rtsr.upscaler import Upscaler

SR = 16000
TOLERANCE = 1e-4
BROKER_READY = re.compile(r"frontend (tcp://\S+), backend (tcp://\S+)")
WORKER_READY = re.compile(r"broker (tcp://\S+)")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemoryWatch:
    """Peak RSS of some processes, sampled in a thread until stopped."""

    def __init__(self, procs: dict[str, int], every_s: float = 0.5):
        self.procs, self.peak = procs, dict.fromkeys(procs, 0.0)
        self.series: dict[str, list[float]] = {k: [] for k in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for name, pid in self.procs.items():
                mb = rss_mb(pid)
                self.series[name].append(mb)
                self.peak[name] = max(self.peak[name], mb)

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return {k: {"start_mb": round(v[0], 1) if v else 0.0, "end_mb": round(v[-1], 1) if v else 0.0,
                    "peak_mb": round(self.peak[k], 1)} for k, v in self.series.items()}


def run_streams(endpoint: str, signals: list[np.ndarray], kill: tuple[float, Server] | None = None) -> list[dict]:
    """One client thread per stream (even: bursty, odd: paced); optionally kill a process at a time."""
    results: list[dict] = [{} for _ in signals]

    def one(i: int) -> None:
        c = Client(endpoint, timeout=30.0)
        try:
            y = c.upscale(signals[i], SR, stream=f"s{i}", realtime=bool(i % 2), window=10)
            results[i] = {"output": y}
        except (ServerError, TimeoutError) as e:
            results[i] = {"error": getattr(e, "code", "timeout")}
        finally:
            results[i].update(mode="paced" if i % 2 else "bursty", counts=dict(c.counts))
            c.shutdown()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(signals))]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    if kill is not None:
        at, proc = kill
        time.sleep(max(at - (time.monotonic() - t0), 0))
        proc.proc.send_signal(signal.SIGKILL)
    for th in threads:
        th.join()
    return results


def summarise(name: str, results: list[dict], refs: list[np.ndarray], memory: dict, allowed: set[str]) -> dict:
    counts: Counter[str] = Counter()
    whole = bad = 0
    for r, ref in zip(results, refs, strict=True):
        counts.update(r["counts"])
        if "output" in r:
            y = r["output"]
            ok = bool(y.shape == ref.shape and np.abs(y - ref).max() <= TOLERANCE * max(np.abs(ref).max(), 1e-9))
            whole += ok
            bad += not ok
        elif r["error"] not in allowed:
            bad += 1
    errors = {k[6:]: v for k, v in counts.items() if k.startswith("error ")}
    return {"scenario": name, "streams": len(results), "whole": whole,
            "ended_by_allowed_error": len(results) - whole - bad, "broken": bad, "sent": counts["sent"],
            "resent": counts["resent"], "answered": counts["answered"],
            "errors": errors, "memory": memory}


def table(rows: list[dict]) -> str:
    return "\n".join(markdown_table(
        ["scenario", "streams", "whole", "ended by worker_lost", "broken", "blocks sent", "resent", "answered",
         "errors by code", "peak RSS MB (start -> end)"],
        [[r["scenario"], r["streams"], r["whole"], r["ended_by_allowed_error"], r["broken"], r["sent"], r["resent"],
          r["answered"], ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "-",
          "; ".join(f"{k} {m['peak_mb']:.0f} ({m['start_mb']:.0f} -> {m['end_mb']:.0f})"
                    for k, m in r["memory"].items())] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--model", default="basic")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    signals = [speech_like(SR, a.seconds, seed=i)[:, 0] for i in range(a.streams)]
    up = Upscaler.load(a.model, a.device)
    refs = [up.upscale(x, SR) for x in signals]
    rows = []
    with Server(a.model, a.device, 120) as serve:
        watch = MemoryWatch({"serve": serve.proc.pid})
        results = run_streams(serve.endpoint, signals)
        rows.append(summarise("rtsr serve", results, refs, watch.stop(), set()))
    broker_args = ["broker", "--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*"]
    with Server(a.model, a.device, 120, broker_args, BROKER_READY) as broker:
        backend = broker.endpoints[1]
        worker_args = ["serve", "--connect-broker", backend, "--model", a.model, "--device", a.device]
        with Server(a.model, a.device, 120, worker_args, WORKER_READY) as w1, \
                Server(a.model, a.device, 120, worker_args, WORKER_READY) as w2:
            with Client(broker.endpoint, timeout=30.0) as c:  # both workers registered before streams start
                deadline = time.monotonic() + 60
                while len(c.stats()["workers"]) < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
            watch = MemoryWatch({"broker": broker.proc.pid, "worker 1": w1.proc.pid, "worker 2": w2.proc.pid})
            results = run_streams(broker.endpoint, signals, kill=(a.seconds / 2, w2))
            rows.append(summarise("rtsr broker, 2 workers, worker 2 killed halfway", results, refs, watch.stop(),
                                  {"worker_lost"}))
    report = {"machine": machine_line(machine(a.device)), "streams": a.streams, "seconds": a.seconds,
              "model": a.model, "rows": rows}
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{a.streams} streams x {a.seconds:g} s of 16 kHz audio, model {a.model}; {report['machine']}\n")
        print(table(rows))
    return 0 if all(r["broken"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
