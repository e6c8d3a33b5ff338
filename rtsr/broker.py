"""`rtsr broker`: one address for clients, any number of `rtsr serve --connect-broker` workers behind it.

    rtsr broker --frontend tcp://127.0.0.1:5557 --backend tcp://127.0.0.1:5560
    rtsr serve --connect-broker tcp://127.0.0.1:5560     # as many as there are cores or GPUs

A stream's engine state lives in one worker, so the broker routes by stream, not by message: an
`open` goes to the worker with the fewest streams (among those with room), and everything else of
that (client, stream) follows it until a reply says the stream is gone (`closed`, or an error with
"closed": true). Workers announce themselves with "ready" heartbeats every second; one silent for
`--worker-timeout` (5 s), or whose connection is found gone, is forgotten and each of its clients
is told at once (`worker_lost`). Nothing is dropped on a full ZeroMQ queue (rtsr.flow): replies
wait per client and requests per worker; audio for a worker too far behind is refused `busy` with
its seq, go-back-N. A client that vanishes, or stops reading past the bound, has its streams
cancelled on their workers. The broker reads headers only; PCM passes through untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from rtsr import protocol as P
from rtsr.curve import CurveKeyError, add_curve_argument, curve_keys, warn_if_open
from rtsr.flow import FlowControl
from rtsr.transport import FLUSH_S, MAX_DROPPED_REMEMBERED, POLL_S, Transport, attach, drain, nbytes, router_sender

log = logging.getLogger("rtsr.broker")
DEFAULT_BACKEND = "tcp://127.0.0.1:5560"
WORKER_TIMEOUT_S = 5.0  # silence before a worker counts as dead or hung: workers beat every second
MAX_WORKER_BACKLOG = 8 * 1024 * 1024  # bytes waiting for one worker before audio to it is refused (busy)
BUSY_RETRY_MS = 50


@dataclass
class Worker:
    capacity: int
    seen: float
    assigned: int = 0  # when it last got a stream (a counter), so ties rotate
    streams: set[tuple[bytes, P.StreamId]] = field(default_factory=set)


class Broker:
    """Routing state and the two-socket loop."""

    def __init__(self, frontend: str = P.DEFAULT_ENDPOINT, backend: str = DEFAULT_BACKEND,
                 transport: Transport | None = None, max_frame_bytes: int = P.MAX_FRAME_BYTES,
                 worker_timeout: float = WORKER_TIMEOUT_S):
        self.t = transport or Transport()
        self.frontend_addr, self.backend_addr = frontend, backend
        self.max_frame_bytes, self.worker_timeout = max_frame_bytes, worker_timeout
        self.workers: dict[bytes, Worker] = {}
        self.routes: dict[tuple[bytes, P.StreamId], bytes] = {}
        self.resend_from: dict[tuple[bytes, P.StreamId], int] = {}  # busy refusals: go-back-N per stream
        self.dropped: dict[tuple[bytes, P.StreamId], str] = {}  # streams of clients dropped for not reading
        self._assigned = 0

    def run(self) -> None:
        """Serve until `transport.stop` is set."""
        ctx = zmq.Context()
        self.front, self.back = self.t.socket(ctx, zmq.ROUTER), self.t.socket(ctx, zmq.ROUTER)
        for s in (self.front, self.back):
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # replies wait per client and requests to a worker per worker, never dropped (rtsr.flow)
        self.to_clients = FlowControl(router_sender(self.front), self.t.flow, on_gone=self._client_gone)
        self.to_workers = FlowControl(router_sender(self.back), self.t.flow, on_gone=self._drop_worker)
        try:
            with self.t.authenticator(ctx):
                self.t.ready({"frontend": attach(self.front, self.frontend_addr, True),
                              "backend": attach(self.back, self.backend_addr, True)})
                poller = zmq.Poller()
                poller.register(self.front, zmq.POLLIN)
                poller.register(self.back, zmq.POLLIN)
                while not self.t.stop.is_set():
                    self.to_workers.flush()
                    self.to_clients.flush()
                    waiting = self.to_workers.waiting() or self.to_clients.waiting()
                    ready = dict(poller.poll(int((FLUSH_S if waiting else POLL_S) * 1000)))
                    if self.back in ready:  # replies first: they free capacity
                        for m in drain(self.back):
                            self._from_worker(m[0].bytes, [f.bytes for f in m[1:]])
                    msgs = drain(self.front) if self.front in ready else []
                    for m in self.to_clients.admit([(m[0].bytes, m, nbytes(m)) for m in msgs]):
                        self._from_client(m[0].bytes, m[1:])
                    self._expire_workers()
                    self._drop_slow_clients()
        finally:
            self.front.close(0)
            self.back.close(0)
            ctx.term()

    # --- clients ----------------------------------------------------------------------------

    def _from_client(self, client: bytes, frames: list[zmq.Frame]) -> None:
        try:
            P.check_sizes(frames, self.max_frame_bytes)
            h = P.decode_header(frames[0].buffer)
            key = (client, h.get("stream"))
            if h["type"] == "stats":
                self._to_client(client, P.encode(self._stats()))
                return
            worker = self.routes.get(key)
            if worker is not None:
                if h["type"] == "audio":
                    self._admit_audio(key, worker, h.get("seq"))
                self._to_worker(worker, [client, *frames])
            elif key in self.dropped:
                raise P.ProtocolError(P.NOT_READING, f"stream {key[1]!r} was dropped: {self.dropped[key]}", key[1],
                                      h.get("seq"), closed=True)
            elif h["type"] != "open":
                raise P.ProtocolError(P.UNKNOWN_STREAM, f"no open stream {key[1]!r} (open it first)", key[1],
                                      h.get("seq"), closed=True)
            else:
                while True:  # a worker found gone on this send is dropped: the next one is tried
                    worker = self._pick(key[1])
                    self.to_workers.put(worker, [client, *frames])
                    if worker in self.workers:
                        break
                self.routes[key] = worker
                self.workers[worker].streams.add(key)
        except P.ProtocolError as e:
            self._to_client(client, P.encode(e.header()))

    def _admit_audio(self, key: tuple[bytes, P.StreamId], worker: bytes, seq: Any) -> None:
        """Refuse (busy, with the seq) audio for a worker whose backlog is past the bound, and every
        later block of that stream until the refused one is sent again (go-back-N: nothing shifts)."""
        first = self.resend_from.get(key)
        if (first is not None and isinstance(seq, int) and seq > first) or \
                self.to_workers.waiting_bytes(worker) > MAX_WORKER_BACKLOG:
            first = seq if first is None else first
            self.resend_from[key] = first
            raise P.ProtocolError(P.BUSY, f"the stream's worker is behind; block not forwarded, resend from seq "
                                          f"{first}", key[1], seq, retry_after_ms=BUSY_RETRY_MS, resend_from=first)
        self.resend_from.pop(key, None)

    def _pick(self, sid: P.StreamId) -> bytes:
        """The least-loaded worker with room; ties go to the one that got a stream longest ago."""
        free = [(len(w.streams), w.assigned, wid) for wid, w in self.workers.items() if len(w.streams) < w.capacity]
        if not free:
            code = P.BUSY if self.workers else P.NO_WORKER
            raise P.ProtocolError(code, "all workers are full" if self.workers else "no worker is connected",
                                  sid, closed=True)
        wid = min(free)[2]
        self._assigned += 1
        self.workers[wid].assigned = self._assigned
        return wid

    def _stats(self) -> dict[str, Any]:
        return {"type": "stats", "streams": len(self.routes),
                "workers": [{"id": wid.hex(), "streams": len(w.streams), "capacity": w.capacity}
                            for wid, w in self.workers.items()]}

    def _to_client(self, client: bytes, frames: list[bytes]) -> None:
        self.to_clients.put(client, frames)

    def _client_gone(self, client: bytes) -> None:
        """A vanished client: its streams are cancelled on their workers."""
        self._release_client(client, None)

    def _drop_slow_clients(self) -> None:
        for client, reason in self.to_clients.overdue():
            streams = self._release_client(client, reason)
            log.warning("client %s is not reading its replies (%s): dropped %d streams", client.hex(), reason,
                        len(streams))
            self.to_clients.dropped(client, [P.encode(P.ProtocolError(
                P.NOT_READING, f"stream dropped: {reason}", sid, closed=True).header()) for sid in streams])

    def _release_client(self, client: bytes, reason: str | None) -> list[P.StreamId]:
        """Unroute a client's streams and cancel them on their workers; with a reason, remember why."""
        keys = [k for k in self.routes if k[0] == client]
        for key in keys:
            worker = self._unroute(key)
            if reason is not None:
                self.dropped[key] = reason
            if worker in self.workers:
                self._to_worker(worker, [client, *P.encode({"type": "cancel", "stream": key[1]})])
        while len(self.dropped) > MAX_DROPPED_REMEMBERED:
            del self.dropped[next(iter(self.dropped))]
        return [k[1] for k in keys]

    # --- workers ----------------------------------------------------------------------------

    def _from_worker(self, worker: bytes, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        client, header = frames[0], frames[1]
        try:
            h = json.loads(header)
        except ValueError:
            log.warning("worker %s sent a bad header", worker.hex())
            return
        w = self.workers.get(worker)
        if not client:  # heartbeat
            if w is None:
                log.info("worker %s joined (capacity %s)", worker.hex(), h.get("capacity"))
                w = self.workers[worker] = Worker(int(h.get("capacity", 1)), time.monotonic())
            w.seen, w.capacity = time.monotonic(), int(h.get("capacity", w.capacity))
            return
        if w is not None:
            w.seen = time.monotonic()
        key = (client, h.get("stream"))
        if (h.get("type") == "closed" or h.get("closed")) and self.routes.get(key) == worker:
            self._unroute(key)
        self._to_client(client, frames[1:])

    def _to_worker(self, worker: bytes, frames: list) -> None:
        """Queued if the worker's queue is full (its backlog bounds audio by `busy`); a worker whose
        connection is gone is dropped, which tells each of its clients."""
        self.to_workers.put(worker, frames)

    def _unroute(self, key: tuple[bytes, P.StreamId]) -> bytes | None:
        self.resend_from.pop(key, None)
        worker = self.routes.pop(key, None)
        if worker in self.workers:
            self.workers[worker].streams.discard(key)
        return worker

    def _drop_worker(self, worker: bytes) -> None:
        w = self.workers.pop(worker, None)
        if w is None:
            return
        log.warning("worker %s lost with %d streams", worker.hex(), len(w.streams))
        self.to_workers.dropped(worker, [])
        for key in list(w.streams):
            self.routes.pop(key, None)
            self.resend_from.pop(key, None)
            self._to_client(key[0], P.encode(P.ProtocolError(P.WORKER_LOST, "the stream's worker stopped "
                                                             "answering", key[1], closed=True).header()))

    def _expire_workers(self) -> None:
        now = time.monotonic()
        for wid in [wid for wid, w in self.workers.items() if now - w.seen > self.worker_timeout]:
            self._drop_worker(wid)


def _stream_of(header: Any) -> P.StreamId:
    try:
        return json.loads(bytes(header)).get("stream")
    except ValueError:
        return None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "broker", help="load-balance streams over several `rtsr serve --connect-broker` workers",
        description="Clients connect to --frontend exactly as to `rtsr serve`; workers connect to --backend. "
                    "Each new stream goes to the least-loaded worker and stays there.")
    p.add_argument("--frontend", default=P.DEFAULT_ENDPOINT, help="bound for clients (default: %(default)s)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, help="bound for workers (default: %(default)s)")
    p.add_argument("--max-frame-bytes", type=int, default=P.MAX_FRAME_BYTES,
                   help="largest PCM frame forwarded (default: %(default)s)")
    p.add_argument("--worker-timeout", type=float, default=WORKER_TIMEOUT_S, metavar="S",
                   help="forget a connected worker silent this long (default: %(default)s)")
    p.add_argument("--hwm", type=int, default=Transport.hwm, help="ZeroMQ high-water mark (default: %(default)s)")
    add_curve_argument(p, "accept only clients and workers whose public key is in DIR/authorized/")
    p.set_defaults(func=run_broker)


def run_broker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        keys = curve_keys(args.curve_keys, server=True)
    except CurveKeyError as e:
        print(f"rtsr broker: {e}", file=sys.stderr)
        return 2
    for endpoint in (args.frontend, args.backend):
        warn_if_open(endpoint, keys, "rtsr broker")
    try:
        Broker(args.frontend, args.backend, Transport(hwm=args.hwm, name="rtsr broker", curve=keys),
               args.max_frame_bytes, args.worker_timeout).run()
    except zmq.ZMQError as e:
        print(f"rtsr broker: {e}", file=sys.stderr)
        return 2
    return 0
