"""Flow control (rtsr.flow) without sockets, then through `rtsr serve` with a client that bursts."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from test_serve import ANY_PORT, TIMEOUT, client, noise, router, running, service, wait_for_workers

from rtsr import protocol as P
from rtsr.broker import Broker
from rtsr.client import Client
from rtsr.flow import FlowControl, FlowLimits
from rtsr.serve import serve_worker


class FakeSocket:
    """Takes `room` messages per peer until read() frees them; `gone` peers are disconnected."""

    def __init__(self, room: int):
        self.room, self.queued, self.delivered, self.gone = room, {}, {}, set()

    def send(self, peer, frames):
        if peer in self.gone:
            return "gone"
        q = self.queued.setdefault(peer, [])
        if len(q) >= self.room:
            return "full"
        q.append(frames)
        return "sent"

    def read(self, peer):
        self.delivered.setdefault(peer, []).extend(self.queued.pop(peer, []))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_replies_wait_in_order_and_requests_are_held_meanwhile():
    sock, clock = FakeSocket(room=2), Clock()
    flow = FlowControl(sock.send, FlowLimits(max_unsent_bytes=10_000, max_stall_s=5.0), clock)
    for i in range(5):
        flow.put(b"a", [b"r%d" % i])
    flow.put(b"b", [b"other"])  # another peer is not held up
    assert sock.queued[b"b"] == [[b"other"]] and flow.waiting()
    ready = flow.admit([(b"a", "req5", 4), (b"b", "breq", 4), (b"a", "req6", 4)])
    assert ready == ["breq"]  # a's requests wait while its replies do
    sock.read(b"a")
    flow.flush()
    assert flow.admit([(b"a", "req7", 4)]) == []  # r4 still waits: 2 more sent, 1 left
    sock.read(b"a")
    flow.flush()
    assert not flow.waiting()
    assert flow.admit([(b"a", "req8", 4)]) == ["req5", "req6", "req7", "req8"]  # held ones first, in order
    sock.read(b"a")
    assert [f[0] for f in sock.delivered[b"a"]] == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    assert flow.overdue() == []


def test_a_peer_that_does_not_read_is_dropped_past_the_bound_and_told_once():
    sock, clock = FakeSocket(room=1), Clock()
    flow = FlowControl(sock.send, FlowLimits(max_unsent_bytes=100, max_stall_s=5.0), clock)
    flow.put(b"slow", [b"x" * 10])
    flow.put(b"slow", [b"y" * 10])  # queued: the socket holds 1
    clock.t = 4.9
    assert flow.overdue() == []
    clock.t = 5.1
    (peer, reason), = flow.overdue()
    assert peer == b"slow" and "no reply taken for 5.1 s" in reason
    flow.dropped(b"slow", [[b"notice"]])
    assert flow.overdue() == []  # the notice waits; it is not re-reported
    assert flow.admit([(b"slow", "late", 4)]) == ["late"]  # answered at once (with not_reading), not held
    clock.t = 1000.0
    assert flow.overdue() == [] and flow.waiting()  # the notice waits for it to read, however long
    sock.read(b"slow")
    flow.flush()
    sock.read(b"slow")
    assert sock.delivered[b"slow"][-1] == [b"notice"]
    big = FlowControl(FakeSocket(room=0).send, FlowLimits(max_unsent_bytes=100, max_stall_s=60), clock)
    big.put(b"p", [b"z" * 60])
    big.admit([(b"p", "req", 50)])  # held requests count too
    assert "MiB of replies and requests" in big.overdue()[0][1]


def test_a_gone_peer_is_reported_and_forgotten():
    sock, gone = FakeSocket(room=1), []
    flow = FlowControl(sock.send, on_gone=gone.append)
    flow.put(b"p", [b"1"])
    flow.put(b"p", [b"2"])
    sock.gone.add(b"p")
    flow.flush()
    assert gone == [b"p"] and not flow.waiting()


def test_a_burst_of_400_blocks_comes_back_whole(up):
    """What a file filter does: 400 blocks (8 s) sent before reading a single reply."""
    x = noise(16000, 8.0)
    with router(service(up)) as ep, client(ep) as c:
        c.open("burst", 16000)
        blocks = [x[i:i + 320] for i in range(0, len(x), 320)]
        for b in blocks:
            c.send("burst", b)
        out = []
        for seq in range(len(blocks)):
            r = c.recv(TIMEOUT)
            assert r.type == "audio" and r.header["seq"] == seq, r.header
            out.append(r.audio)
        c.close("burst")
        while (r := c.recv(TIMEOUT)).type != "closed":
            out.append(r.audio)
    y = np.concatenate(out)
    ref = up.upscale(x, 16000)
    assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_rate_refusals_go_back_n_so_a_resent_stream_is_whole(up):
    """A stream over --max-speed: the refused block and every later one carry their seq and
    resend_from; resending from there gives the offline output (no gap, no shift)."""
    x = noise(16000, 3.0)
    blocks = [x[i:i + 1600] for i in range(0, len(x), 1600)]  # 100 ms
    with router(service(up, max_speed=1.0, burst_s=0.5)) as ep, client(ep) as c:
        c.open("r", 16000)
        for b in blocks:
            c.send("r", b)
        got, refused = [], []
        for _ in blocks:
            r = c.recv(TIMEOUT)
            (got if r.type == "audio" else refused).append(r.header)
        assert refused and all(h["code"] == P.RATE and "retry_after_ms" in h for h in refused)
        first = refused[0]["seq"]
        assert [h["seq"] for h in got] == list(range(first))  # in order, nothing past the refusal
        assert [h["seq"] for h in refused] == list(range(first, len(blocks)))
        assert {h["resend_from"] for h in refused} == {first}
        y = c.upscale(x, 16000, stream="whole", block_ms=100, window=64)  # the client resends as told
    ref = up.upscale(x, 16000)
    assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def _bursty(ep: str, sid: str, x: np.ndarray, burst: int = 10) -> np.ndarray:
    """A client that sends `burst` blocks, then reads what has come, and so on; resends as told."""
    c = Client(ep, timeout=TIMEOUT)
    try:
        return c.upscale(x, 16000, stream=sid, window=burst)
    finally:
        c.shutdown()


def test_eight_bursty_streams_through_a_broker_with_two_workers_come_back_whole(up):
    sigs = [noise(16000, 2.0, seed=i) for i in range(8)]
    outs: dict[int, np.ndarray] = {}
    with running(lambda t: Broker(ANY_PORT, ANY_PORT, t).run()) as eps, \
            running(lambda t: serve_worker(service(up), eps["backend"], t)), \
            running(lambda t: serve_worker(service(up), eps["backend"], t)), client(eps["frontend"]) as c:
        wait_for_workers(c, 2)
        threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, _bursty(eps["frontend"], f"s{i}", sigs[i])))
                   for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    assert sorted(outs) == list(range(8))
    for i, x in enumerate(sigs):
        ref = up.upscale(x, 16000)
        assert outs[i].shape == ref.shape and np.abs(outs[i] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_killed_worker_process_is_reported_unasked_within_seconds(tiny_model_dir, up):
    """A worker process SIGKILLed mid-stream: its client gets worker_lost without sending anything."""
    with running(lambda t: Broker(ANY_PORT, ANY_PORT, t).run()) as eps, client(eps["frontend"]) as c:
        proc = subprocess.Popen([sys.executable, "-m", "rtsr.cli", "serve", "--connect-broker", eps["backend"],
                                 "--model", str(tiny_model_dir)], stderr=subprocess.DEVNULL)
        try:
            wait_for_workers(c, 1, timeout=60)
            c.open("s", 16000)
            c.send("s", noise(16000, 0.02))
            assert c.recv().type == "audio"
            proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            r = c.recv(TIMEOUT)
            assert (r.type, r.header["code"], r.header["closed"]) == ("error", P.WORKER_LOST, True)
            assert time.monotonic() - t0 < 7.0
        finally:
            proc.kill()
            proc.wait()


def test_the_soak_benchmark_loses_nothing(tiny_model_dir):
    """benchmarks/soak_bench.py, small: serve and a broker with a worker killed halfway."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_bench.py"
    r = subprocess.run([sys.executable, str(bench), "--streams", "4", "--seconds", "1.5", "--model",
                        str(tiny_model_dir), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    serve_row, broker_row = json.loads(r.stdout)["rows"]
    assert serve_row["whole"] == 4 and serve_row["answered"] == serve_row["sent"] == 4 * 75
    assert broker_row["broken"] == 0 and broker_row["whole"] + broker_row["ended_by_allowed_error"] == 4
    assert broker_row["whole"] >= 1 and broker_row["errors"].get("worker_lost", 0) == broker_row[
        "ended_by_allowed_error"]
