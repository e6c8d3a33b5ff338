"""`rtsr serve` beside a hostile peer: does an honest live stream keep its pace, and the server its memory?

    python benchmarks/hostile_bench.py --model basic --seconds 8 [--json]

For each attack (none, heavy blocks, seq jumps, oversized messages, a peer that never reads, a
peer squatting the routing id libzmq would hand out next, deeply nested headers), one honest
client streams 16 kHz audio paced in real time in 20 ms blocks while the attacker runs, against a
fresh `rtsr serve` subprocess. Per row: the honest stream's round trips (p50/p99/max), blocks
without a reply, the server's peak RSS, and whether it is still alive. The bar (issue 27): every
honest block answered, no stall over a second, memory within the documented bound + 200 MB.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq
from serve_bench import Server, percentiles

from rtsr import protocol as P
from rtsr.bench import machine, machine_line, speech_like
from rtsr.client import Client
from rtsr.report import markdown_table

SR, BLOCK_MS = 16000, 20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def dealer(endpoint: str, routing_id: bytes | None = None, rcvhwm: int = 1000) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, rcvhwm)
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    s.connect(endpoint)
    return ctx, s


def opened(s: zmq.Socket, stream: P.StreamId, sr: int, dtype: str = "float32") -> str:
    s.send_multipart(P.encode({"type": "open", "stream": stream, "sr": sr, "dtype": dtype}))
    while s.poll(10_000):
        h = json.loads(s.recv_multipart()[0])
        if h.get("type") in ("opened", "error") and h.get("stream") == stream:
            return h.get("token", "")
    return ""


def drain(s: zmq.Socket) -> None:
    while s.poll(0):
        s.recv_multipart()


def repeat(endpoint: str, stop: threading.Event, message: Callable[[zmq.Socket, int], list[bytes]],
           wait_ms: int) -> None:
    """Send message(socket, i) for i = 0, 1, ... until stopped, reading (and dropping) the replies."""
    ctx, s = dealer(endpoint)
    i = 0
    while not stop.is_set():
        s.send_multipart(message(s, i))
        i += 1
        s.poll(wait_ms)
        drain(s)
    s.close(0)
    ctx.term()


def heavy(endpoint: str, stop: threading.Event) -> None:
    """Blocks of the largest legal size (1 s of 8 kHz int16), as fast as they are answered."""
    block, token = np.zeros(8000, "<i2").tobytes(), {}

    def message(s: zmq.Socket, seq: int) -> list[bytes]:
        token.setdefault("h", opened(s, "h", 8000, "int16"))
        return P.encode({"type": "audio", "stream": "h", "token": token["h"], "seq": seq}, block)
    repeat(endpoint, stop, message, 200)


def seq_jumps(endpoint: str, stop: threading.Event) -> None:
    """A new 384 kHz stream per message whose first seq is 1,919,999 (a gap of silence to fill, or a refusal)."""
    def message(s: zmq.Socket, i: int) -> list[bytes]:
        return P.encode({"type": "audio", "stream": i, "token": opened(s, i, 384000), "seq": 1_919_999},
                        np.zeros(16, np.float32).tobytes())
    repeat(endpoint, stop, message, 50)


def oversized(endpoint: str, stop: threading.Event) -> None:
    """100 MB messages, again and again (each cuts the sender's connection)."""
    big = bytes(100 * 2**20)
    while not stop.is_set():
        ctx, s = dealer(endpoint)
        s.send_multipart([b'{"type":"stats"}', big])
        time.sleep(0.2)
        s.close(0)
        ctx.term()


def never_reads(endpoint: str, stop: threading.Event) -> None:
    """Opens a stream, sends 3,000 blocks of 0.25 s and never reads a reply."""
    ctx, s = dealer(endpoint, rcvhwm=1)
    token = opened(s, "n", SR)
    block = np.zeros(SR // 4, np.float32).tobytes()
    for seq in range(3000):
        if stop.is_set():
            break
        if s.poll(0, zmq.POLLOUT):
            s.send_multipart(P.encode({"type": "audio", "stream": "n", "token": token, "seq": seq}, block))
        else:
            time.sleep(0.01)
    stop.wait()
    s.close(0)
    ctx.term()


def squatter(endpoint: str, stop: threading.Event) -> None:
    """Connects under the routing id an unseeded libzmq hands out next, many times over."""
    socks = [dealer(endpoint, b"\x00\x6b\x8b\x45" + bytes([0x67 + i])) for i in range(8)]
    for _, s in socks:
        s.send_multipart(P.encode({"type": "nonsense"}))
    stop.wait()
    for ctx, s in socks:
        s.close(0)
        ctx.term()


def deep_json(endpoint: str, stop: threading.Event) -> None:
    deep = b'{"type":"stats","x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    repeat(endpoint, stop, lambda s, i: [deep], 20)


ATTACKS: dict[str, Callable[[str, threading.Event], None] | None] = {
    "none": None, "heavy blocks": heavy, "seq jumps": seq_jumps, "100 MB messages": oversized,
    "never reads": never_reads, "routing-id squatter": squatter, "nested headers": deep_json}


def honest(endpoint: str, seconds: float, server: Server) -> dict:
    """One paced stream; round trip per block, blocks unanswered, the server's peak RSS meanwhile."""
    x = speech_like(SR, seconds)
    block = SR * BLOCK_MS // 1000
    rtt, peak, sent_at = [], 0.0, {}

    def take_until(deadline: float) -> None:
        while (left := deadline - time.monotonic()) > 0:
            try:
                r = c.recv(left)
            except TimeoutError:
                return
            if r.type == "audio" and r.header.get("seq") in sent_at:
                rtt.append(time.monotonic() - sent_at.pop(r.header["seq"]))

    with Client(endpoint, timeout=10.0) as c:
        c.open("honest", SR)
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(x), block)):
            take_until(t0 + (i + block) / SR)
            sent_at[k] = time.monotonic()
            c.send("honest", x[i:i + block])
            peak = max(peak, rss_mb(server.proc.pid))
        take_until(time.monotonic() + 3.0)
    return {**percentiles(1000 * np.array(rtt or [np.nan])), "unanswered": len(sent_at), "peak_rss_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="basic")
    p.add_argument("--seconds", type=float, default=8.0, help="honest stream length per attack")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, from: " + ", ".join(ATTACKS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    for name in args.attacks.split(","):
        with Server(args.model, "cpu", 120) as server:
            base = rss_mb(server.proc.pid)
            stop = threading.Event()
            attack = ATTACKS[name]
            th = threading.Thread(target=attack, args=(server.endpoint, stop), daemon=True) if attack else None
            if th:
                th.start()
                time.sleep(0.5)
            row = honest(server.endpoint, args.seconds, server)
            stop.set()
            if th:
                th.join(10)
            rows.append({"attack": name, **row, "start_rss_mb": base, "alive": server.proc.poll() is None})
    if args.json:
        print(json.dumps({"machine": machine("cpu"), "rows": rows}, indent=1))
        return
    print(f"rtsr serve, model {args.model}, one honest 16 kHz stream paced in {BLOCK_MS} ms blocks for "
          f"{args.seconds:g} s beside each attack; {machine_line(machine('cpu'))}")
    head = ["attack", "honest p50 / p99 / max ms", "unanswered", "RSS start -> peak MB", "alive"]
    print("\n".join(markdown_table(head, [
        [r["attack"], f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.1f}", r["unanswered"],
         f"{r['start_rss_mb']:.0f} -> {r['peak_rss_mb']:.0f}", "yes" if r["alive"] else "NO"] for r in rows])))

if __name__ == "__main__":
    main()
