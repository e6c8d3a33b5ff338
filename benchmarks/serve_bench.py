"""`rtsr serve` under N live streams: per-block round trip, late replies, and output == upscale.

Starts `rtsr serve` as a subprocess on a free loopback port (`--server-threads` model threads, 1 by default, and
OMP_NUM_THREADS=1 is exported too), then for N = 1, 2, 4, 8, 16 concurrent streams, each from its
own DEALER client (`rtsr.client.Client`, all driven by one event loop in this process), sends a
speech-like test signal in 20 ms blocks paced in real time: block k goes out when its last sample
would have arrived from a live source. Streams start evenly spread over one block period, as
independent sources would (`--aligned`: all at once, the worst case for a server without batching).

    python benchmarks/serve_bench.py --model basic --seconds 10 [--json]

Round trip: from just before a block is sent to the moment its reply is read. A reply is late when
it comes more than one block (20 ms) after its send. Sends never block: a block the socket pushes
back on waits in this process and counts in "send lag" (its delay behind real time), so an
overloaded server shows up there as well as in the round trips. After the runs, every stream's
concatenated output (audio replies and the close tail) is compared with `Upscaler.upscale` of its
input, computed in this process (max |delta| / max |reference|; must be at most 1e-4).

Reported: the largest N whose p99 round trip stays under the block length, counting only N for
which it and every smaller N tried stay under. The client loop shares the machine with the server,
so numbers from a loaded machine (see the load average line) are pessimistic.
Exit status: 0, 1 when an output does not match, 2 when the server or a stream fails.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from rtsr.backends import BACKENDS
from rtsr.bench import machine, machine_line, speech_like
from rtsr.client import Client, ServerError
from rtsr.report import markdown_table
from rtsr.upscaler import Upscaler

STREAM = "bench"
MAX_REL_DELTA = 1e-4  # the README's streaming == offline tolerance
WARMUP_S = 0.5


class Server:
    """An rtsr service in a subprocess on OS-chosen loopback ports, stopped with SIGINT (then harder).

    Default: `rtsr serve` on a ROUTER; `args` and `ready` (the log line that carries the endpoints,
    its groups become `endpoints`) make it `rtsr broker` or a worker instead."""

    READY = re.compile(r"router (tcp://\S+)")

    def __init__(self, model: str, device: str, start_timeout: float, args: list[str] | None = None,
                 ready: re.Pattern | None = None, threads: int = 1, backend: str = "auto"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "rtsr.cli", *(args or ["serve", "--bind", "tcp://127.0.0.1:*", "--model", model,
                                                           "--device", device, "--threads", str(threads),
                                                           "--backend", backend])]
        self.ready_line = ready or self.READY
        self.endpoints: tuple[str, ...] = ()
        self.log: deque[str] = deque(maxlen=40)
        self.endpoint: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._read_log, daemon=True).start()
        deadline = time.monotonic() + start_timeout
        try:
            while not self._ready.wait(0.1):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(cmd[3:5])} did not start (exit status {self.proc.poll()}):\n"
                                       + "\n".join(self.log))
        except BaseException:  # also SIGTERM/Ctrl-C while it loads: never leave it running
            self.stop()
            raise

    def _read_log(self) -> None:
        """Keep the server's stderr drained (a full pipe would stall it); the tail goes into errors."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            m = self.ready_line.search(line)
            if m and not self._ready.is_set():
                self.endpoint, self.endpoints = m.group(1), m.groups()
                self._ready.set()

    def stop(self) -> int:
        """SIGINT (serve exits 130 after closing its socket); terminate, then kill, if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def percentiles(ms: np.ndarray) -> dict[str, float]:
    return {**{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}, "max_ms": float(ms.max())}


def run_streams(endpoint: str, signals: list[np.ndarray], sr: int, block_ms: float, aligned: bool,
                timeout: float) -> tuple[dict[str, Any], list[np.ndarray]]:
    """All signals at once, one client each, paced in real time; returns the row and each output."""
    n = len(signals)
    block = round(sr * block_ms / 1000)
    starts = [range(0, len(x), block) for x in signals]
    clients = [Client(endpoint, timeout) for _ in range(n)]
    try:
        for c in clients:
            c.open(STREAM, sr, 1, hop_ms=block_ms)
        poller = zmq.Poller()
        for c in clients:
            poller.register(c.sock, zmq.POLLIN)
        index = {c.sock: i for i, c in enumerate(clients)}
        t0 = time.perf_counter() + 0.02
        offset = [0.0 if aligned else i * block / sr / n for i in range(n)]
        # when block k of stream i has "arrived" (its last sample): the sending schedule, kept in a
        # heap of each stream's next block, so that the loop costs the client nothing between sends
        # (it looked at every stream each pass and took most of a core from the server beside it)
        due = [t0 + offset[i] + np.minimum(np.arange(len(starts[i])) * block + block, len(signals[i])) / sr
               for i in range(n)]
        schedule = [(float(due[i][0]), i) for i in range(n) if len(starts[i])]
        heapq.heapify(schedule)
        sent_at = [np.zeros(len(s)) for s in starts]
        rtt = [np.zeros(len(s)) for s in starts]
        lag = [np.zeros(len(s)) for s in starts]
        nxt, got = [0] * n, [0] * n
        outs: list[list[np.ndarray]] = [[] for _ in range(n)]
        pushed_back, progress = 0, time.perf_counter()
        left = sum(map(len, starts))
        while left:
            pushed = []  # streams whose socket pushes back: their block waits in this process
            while schedule and schedule[0][0] <= time.perf_counter():
                when, i = heapq.heappop(schedule)
                if not clients[i].sock.poll(0, zmq.POLLOUT):
                    pushed.append((when, i))
                    continue
                k = nxt[i]
                sent_at[i][k] = time.perf_counter()
                lag[i][k] = sent_at[i][k] - when
                clients[i].send(STREAM, signals[i][starts[i][k]:starts[i][k] + block])
                nxt[i] += 1
                if nxt[i] < len(starts[i]):
                    heapq.heappush(schedule, (float(due[i][nxt[i]]), i))
            pushed_back += len(pushed)
            for entry in pushed:
                heapq.heappush(schedule, entry)
            wait = 0.001 if pushed else min(schedule[0][0] - time.perf_counter(), 0.05) if schedule else 0.05
            # whole milliseconds, rounded up: a fraction of one is taken as 0, and the loop spun
            for sock, _ in poller.poll(math.ceil(max(wait, 0.0) * 1000)):
                i = index[sock]
                while True:
                    try:
                        r = clients[i].recv(0)
                    except TimeoutError:
                        break
                    now = time.perf_counter()
                    if r.type == "error":
                        raise ServerError(r.header)
                    if r.type != "audio" or r.header.get("seq") != got[i]:
                        raise RuntimeError(f"stream {i}: expected the reply to block {got[i]}, got {r.header}")
                    rtt[i][got[i]] = now - sent_at[i][got[i]]
                    outs[i].append(r.audio)
                    got[i] += 1
                    left -= 1
                    progress = now
            if time.perf_counter() - progress > timeout:
                total = sum(map(len, starts))
                raise TimeoutError(f"no reply for {timeout:g} s ({sum(got)} of {total} blocks answered)")
        for c in clients:
            c.close(STREAM)
        for i, c in enumerate(clients):
            while (r := c.recv()).type != "closed":
                if r.type == "error":
                    raise ServerError(r.header)
                if r.type == "audio":
                    outs[i].append(r.audio)
    finally:
        for c in clients:
            c.shutdown()
    ms, lag_ms = 1000 * np.concatenate(rtt), 1000 * np.concatenate(lag)
    row = {"streams": n, "blocks": len(ms), **percentiles(ms), "late": int((ms > block_ms).sum()),
           "send_lag_p99_ms": float(np.percentile(lag_ms, 99)), "send_lag_max_ms": float(lag_ms.max()),
           "pushed_back": pushed_back}
    return row, [np.concatenate(o) for o in outs]


def check_outputs(up: Upscaler, signals: list[np.ndarray], sr: int, outputs: list[list[np.ndarray]],
                  rows: list[dict]) -> None:
    """Each row gets the worst stream's max relative delta against `upscale` (inf on a length mismatch)."""
    refs: dict[int, np.ndarray] = {}
    for row, outs in zip(rows, outputs, strict=True):
        worst = 0.0
        for i, y in enumerate(outs):
            if i not in refs:
                refs[i] = up.upscale(signals[i], sr)
            ref = refs[i]
            d = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12)) if y.shape == ref.shape else np.inf
            worst = max(worst, d)
        row["max_rel_delta"] = worst
        row["matches"] = bool(worst <= MAX_REL_DELTA)


def render(r: dict[str, Any]) -> str:
    d = r["deadline_ms"]
    lines = [f"rtsr serve, model {r['model']} on {r['device']} (backend {r['backend']}, {r['server_threads']} "
             "model thread(s)), "
             f"{r['seconds']:g} s "
             f"speech-like test signal at {r['input_sr']} Hz per stream, {r['block_ms']:g} ms blocks paced in "
             f"real time, streams {'aligned' if r['aligned'] else 'spread over a block period'}, "
             "one DEALER client each",
             f"machine: {machine_line(r['machine'])}",
             ""]
    lines += markdown_table(
        ["streams", "blocks", "p50 ms", "p95 ms", "p99 ms", "max ms", f"late (> {d:g} ms)", "send lag max ms",
         "max rel delta vs upscale"],
        [[s["streams"], s["blocks"], f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{s['p99_ms']:.2f}",
          f"{s['max_ms']:.2f}", s["late"], f"{s['send_lag_max_ms']:.2f}",
          f"{s['max_rel_delta']:.1e}{'' if s['matches'] else ' MISMATCH'}"] for s in r["rows"]])
    lines += ["", f"largest N whose p99 round trip stays under {d:g} ms (and every smaller N's too): "
                  f"{r['max_streams_p99_under_deadline']}",
              f"outputs equal to Upscaler.upscale (max rel delta <= {MAX_REL_DELTA:g}): "
              f"{'yes' if r['outputs_match'] else 'NO'}; server exit status {r['server_exit']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="basic", help="bundled model name or model folder (default: basic)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="server device (default: cpu)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio per stream (default: 10)")
    p.add_argument("--streams", default="1,2,4,8,16", help="stream counts to run (default: 1,2,4,8,16)")
    p.add_argument("--input-sr", type=int, default=16000, help="test signal rate (default: 16000)")
    p.add_argument("--block-ms", type=float, default=20.0, help="block length and hop, a multiple of 5 "
                                                                 "(default: 20); also the deadline")
    p.add_argument("--aligned", action="store_true", help="start every stream at the same instant")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without a reply before giving up")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--server-threads", type=int, default=1, metavar="N", help="rtsr serve --threads (default: 1)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="rtsr serve --backend, also used for the "
                   "reference outputs (default: auto)")
    args = p.parse_args(argv)
    counts = sorted({int(s) for s in args.streams.split(",")})
    if not counts or counts[0] < 1:
        p.error("--streams: positive integers, comma-separated")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on SIGTERM too
    # a shell starts background jobs with SIGINT ignored, which the server would inherit and then
    # not stop on it: a handled signal is reset to the default in the child instead
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)

    sr = args.input_sr
    signals = [speech_like(sr, args.seconds, seed) for seed in range(max(counts))]
    rows: list[dict] = []
    outputs: list[list[np.ndarray]] = []
    info = machine(args.device)  # load average before anything of ours runs
    try:
        with Server(args.model, args.device, args.timeout, threads=args.server_threads,
                    backend=args.backend) as server:
            assert server.endpoint is not None
            with Client(server.endpoint, args.timeout) as c:  # lazy init: torch, numba kernels, first hop
                c.upscale(speech_like(sr, WARMUP_S, 99), sr, stream="warmup")
            for n in counts:
                row, outs = run_streams(server.endpoint, signals[:n], sr, args.block_ms, args.aligned, args.timeout)
                rows.append(row)
                outputs.append(outs)
                time.sleep(0.2)
        exit_status = server.proc.returncode
    except (ServerError, RuntimeError, TimeoutError) as e:
        print(f"serve_bench: {e}", file=sys.stderr)
        return 2
    check_outputs(Upscaler.load(args.model, args.device, backend=args.backend), signals, sr, outputs, rows)
    fits = 0
    for row in rows:
        if row["p99_ms"] >= args.block_ms:
            break
        fits = row["streams"]
    report = {"command": "serve_bench", "model": str(args.model),
              "model_name": Path(args.model).name, "device": args.device, "seconds": args.seconds,
              "input_sr": sr, "block_ms": args.block_ms, "deadline_ms": args.block_ms, "aligned": args.aligned,
              "server_threads": args.server_threads, "backend": args.backend, "machine": info, "rows": rows,
              "max_streams_p99_under_deadline": fits,
              "outputs_match": all(r["matches"] for r in rows), "server_exit": exit_status}
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0 if report["outputs_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
