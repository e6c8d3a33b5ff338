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
import logging
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from rtsr import protocol as P
from rtsr.curve import CurveKeyError, add_curve_argument, beyond_loopback, curve_keys, peer_is_admin, warn_if_open
from rtsr.flow import FlowControl
from rtsr.transport import (
    FLUSH_S,
    MAX_DROPPED_REMEMBERED,
    POLL_S,
    Transport,
    attach,
    drain,
    nbytes,
    not_reading_notices,
    own_routing_ids,
    router_sender,
)

log = logging.getLogger("rtsr.broker")
DEFAULT_BACKEND = "tcp://127.0.0.1:5560"
WORKER_TIMEOUT_S = 5.0  # silence before a worker counts as dead or hung: workers beat every second
MAX_WORKER_BACKLOG = 8 * 1024 * 1024  # bytes waiting for one worker before audio to it is refused (busy)
BUSY_RETRY_MS = 50
MAX_STREAMS_PER_CLIENT = 16  # one connection's share of all workers' streams
EPOCH_BYTES = 8
STREAM_TYPES = ("open", "audio", "close", "cancel")


@dataclass
class Worker:
    capacity: int
    seen: float
    assigned: int = 0  # when it last got a stream (a counter), so ties rotate
    streams: set[tuple[bytes, P.StreamId]] = field(default_factory=set)


@dataclass
class Route:
    """Where a client's stream lives, and what is owed to it."""

    worker: bytes
    token: str | None = None  # from the worker's `opened`; replies that do not carry it are stale
    in_flight: deque[int] = field(default_factory=deque)  # seqs forwarded and not yet answered


class Broker:
    """Routing state and the two-socket loop.

    Every frame the broker forwards to a worker names the client as this broker's epoch (random,
    per start) + the client's routing id, so a worker's reply that belongs to an earlier broker,
    or to a stream that no longer lives on that worker, or carries another token than the
    stream's, is dropped here instead of reaching whoever holds that routing id now."""

    def __init__(self, frontend: str = P.DEFAULT_ENDPOINT, backend: str = DEFAULT_BACKEND,
                 transport: Transport | None = None, max_frame_bytes: int = P.MAX_FRAME_BYTES,
                 worker_timeout: float = WORKER_TIMEOUT_S, max_streams_per_client: int = MAX_STREAMS_PER_CLIENT):
        self.t = transport or Transport()
        self.frontend_addr, self.backend_addr = frontend, backend
        self.max_frame_bytes, self.worker_timeout = max_frame_bytes, worker_timeout
        self.max_streams_per_client = max_streams_per_client
        self.epoch = secrets.token_bytes(EPOCH_BYTES)
        self.workers: dict[bytes, Worker] = {}
        self.routes: dict[tuple[bytes, P.StreamId], Route] = {}
        self.resend_from: dict[tuple[bytes, P.StreamId], int] = {}  # busy refusals: go-back-N per stream
        self.dropped: dict[tuple[bytes, P.StreamId], str] = {}  # streams of clients dropped for not reading
        self._assigned = 0

    def run(self) -> None:
        """Serve until `transport.stop` is set."""
        ctx = zmq.Context()
        self.front = self.t.socket(ctx, zmq.ROUTER)
        self.back = self.t.socket(ctx, zmq.ROUTER, role="workers")
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
                            self._guarded(self._from_worker, m)
                    msgs = own_routing_ids(drain(self.front) if self.front in ready else [], self._to_client)
                    for m in self.to_clients.admit([(m[0].bytes, m, nbytes(m)) for m in msgs]):
                        self._guarded(self._from_client, m)
                    self._expire_workers()
                    self._drop_slow_clients()
        finally:
            self.front.close(0)
            self.back.close(0)
            ctx.term()

    def _guarded(self, handle: Callable[[bytes, list[zmq.Frame]], None], m: list[zmq.Frame]) -> None:
        """A bug met by one message is logged (and its client told): the broker goes on."""
        try:
            handle(m[0].bytes, m[1:])
        except Exception as e:
            log.exception("message from %s failed", m[0].bytes.hex())
            if handle == self._from_client:
                self._to_client(m[0].bytes, P.encode(P.ProtocolError(
                    P.INTERNAL, f"the broker failed on this message: {type(e).__name__}").header()))

    # --- clients ----------------------------------------------------------------------------

    def _from_client(self, client: bytes, frames: list[zmq.Frame]) -> None:
        try:
            P.check_sizes(frames, self.max_frame_bytes)
            h = P.decode_header(frames[0].buffer)
            key, kind = (client, h.get("stream")), h["type"]
            if kind == "stats":
                if not peer_is_admin(frames[0], self.t.curve):
                    raise P.ProtocolError(P.FORBIDDEN, "stats are for an admin key (or loopback without CURVE)")
                self._to_client(client, P.encode(self._stats()))
                return
            if kind not in STREAM_TYPES:
                raise P.ProtocolError(P.UNKNOWN_TYPE, f"unknown message type {kind!r}", key[1])
            route = self.routes.get(key)
            if route is not None:
                if kind == "open":
                    raise P.ProtocolError(P.DUPLICATE_STREAM, f"stream {key[1]!r} is already open", key[1])
                if kind == "audio":
                    self._admit_audio(key, route.worker, h.get("seq"))
                    route.in_flight.append(h.get("seq"))
                self._to_worker(route.worker, [self.epoch + client, *frames])
            elif key in self.dropped:
                raise P.ProtocolError(P.NOT_READING, f"stream {key[1]!r} was dropped: {self.dropped[key]}", key[1],
                                      h.get("seq"), closed=True)
            elif kind != "open":
                raise P.ProtocolError(P.UNKNOWN_STREAM, f"no open stream {key[1]!r} (open it first)", key[1],
                                      h.get("seq"), closed=True)
            else:
                self._open(key, h, frames)
        except P.ProtocolError as e:
            self._to_client(client, P.encode(e.header()))

    def _open(self, key: tuple[bytes, P.StreamId], h: dict[str, Any], frames: list[zmq.Frame]) -> None:
        """Checked here as a worker would (so a refusal costs no worker a slot), then routed."""
        if len(frames) > 1 and len(frames[1].buffer):
            raise P.ProtocolError(P.BAD_PCM, "an 'open' message carries no PCM frame", key[1], closed=True)
        P.parse_open(h)
        if sum(k[0] == key[0] for k in self.routes) >= self.max_streams_per_client:
            raise P.ProtocolError(P.BUSY, f"this connection has its share of {self.max_streams_per_client} streams "
                                          "open", key[1], closed=True)
        while True:  # a worker found gone on this send is dropped: the next one is tried
            worker = self._pick(key[1])
            self.to_workers.put(worker, [self.epoch + key[0], *frames])
            if worker in self.workers:
                break
        self.routes[key] = Route(worker)
        self.workers[worker].streams.add(key)

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
                "workers": [{"streams": len(w.streams), "capacity": w.capacity} for w in self.workers.values()]}

    def _to_client(self, client: bytes, frames: list[bytes]) -> None:
        self.to_clients.put(client, frames)

    def _client_gone(self, client: bytes) -> None:
        """A vanished client: its streams are cancelled on their workers."""
        self._release_client(client, None)

    def _drop_slow_clients(self) -> None:
        for client, reason in self.to_clients.overdue():
            notices = not_reading_notices(dict.fromkeys(self._release_client(client, reason)),
                                          self.to_clients.unsent(client),
                                          self.to_clients.take_held(client), reason)
            log.warning("client %s is not reading its replies (%s): dropped %d streams", client.hex(), reason,
                        len(notices))
            self.to_clients.dropped(client, notices)

    def _release_client(self, client: bytes, reason: str | None) -> list[P.StreamId]:
        """Unroute a client's streams and cancel them on their workers; with a reason, remember why."""
        keys = [k for k in self.routes if k[0] == client]
        for key in keys:
            route = self._unroute(key)
            if reason is not None:
                self.dropped[key] = reason
            if route is not None and route.token is not None:
                self._cancel(route.worker, key, route.token)
        while len(self.dropped) > MAX_DROPPED_REMEMBERED:
            del self.dropped[next(iter(self.dropped))]
        return [k[1] for k in keys]

    def _cancel(self, worker: bytes, key: tuple[bytes, P.StreamId], token: str) -> None:
        if worker in self.workers:
            self._to_worker(worker, [self.epoch + key[0], *P.encode({"type": "cancel", "stream": key[1],
                                                                     "token": token})])

    # --- workers ----------------------------------------------------------------------------

    def _from_worker(self, worker: bytes, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return
        try:
            h = P.decode_header(frames[1].buffer)
            if not len(frames[0].buffer):
                self._heartbeat(worker, h)
                return
        except P.ProtocolError as e:
            log.warning("worker %s sent a bad message: %s", worker.hex(), e.message)
            return
        w = self.workers.get(worker)
        client_frame = frames[0].bytes
        if w is None or not client_frame.startswith(self.epoch):
            return  # a forgotten worker's, or an earlier broker's: its streams are gone
        w.seen = time.monotonic()
        client, sid, token = client_frame[EPOCH_BYTES:], h.get("stream"), h.get("token")
        key = (client, sid)
        route = self.routes.get(key)
        if route is None or route.worker != worker or (token is not None and route.token not in (None, token)):
            if h["type"] == "opened" and isinstance(token, str):  # opened for a client gone meanwhile
                self._cancel(worker, key, token)
            return
        if h["type"] == "opened":
            route.token = token
        if isinstance(h.get("seq"), int):
            while route.in_flight and route.in_flight[0] != h["seq"]:
                route.in_flight.popleft()
            if route.in_flight:
                route.in_flight.popleft()
        if h["type"] == "closed" or h.get("closed"):
            self._unroute(key)
        self._to_client(client, [f.bytes for f in frames[1:]])

    def _heartbeat(self, worker: bytes, h: dict[str, Any]) -> None:
        """A worker's `ready`: registers a new one (told to drop any streams of an earlier broker's)."""
        if h["type"] != "ready":
            return
        capacity = P.parse_ready(h)
        w = self.workers.get(worker)
        if w is None:
            log.info("worker %s joined (capacity %d)", worker.hex(), capacity)
            w = self.workers[worker] = Worker(capacity, time.monotonic())
            self._to_worker(worker, [b"", *P.encode({"type": "reset"})])
        w.seen, w.capacity = time.monotonic(), capacity

    def _to_worker(self, worker: bytes, frames: list) -> None:
        """Queued if the worker's queue is full (its backlog bounds audio by `busy`); a worker whose
        connection is gone is dropped, which tells each of its clients."""
        self.to_workers.put(worker, frames)

    def _unroute(self, key: tuple[bytes, P.StreamId]) -> Route | None:
        self.resend_from.pop(key, None)
        route = self.routes.pop(key, None)
        if route is not None and route.worker in self.workers:
            self.workers[route.worker].streams.discard(key)
        return route

    def _drop_worker(self, worker: bytes) -> None:
        """Forget a worker; each block in flight to it gets `worker_lost` naming its seq (a stream
        with none in flight gets one, without a seq)."""
        w = self.workers.pop(worker, None)
        if w is None:
            return
        log.warning("worker %s lost with %d streams", worker.hex(), len(w.streams))
        self.to_workers.dropped(worker, [])
        for key in list(w.streams):
            route = self.routes.pop(key, None) or Route(worker)
            self.resend_from.pop(key, None)
            for seq in route.in_flight or [None]:
                self._to_client(key[0], P.encode(P.ProtocolError(
                    P.WORKER_LOST, "the stream's worker stopped answering", key[1], seq, closed=True,
                    **({"token": route.token} if route.token else {})).header()))

    def _expire_workers(self) -> None:
        now = time.monotonic()
        for wid in [wid for wid, w in self.workers.items() if now - w.seen > self.worker_timeout]:
            self._drop_worker(wid)


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
    p.add_argument("--max-streams-per-client", type=int, default=MAX_STREAMS_PER_CLIENT, metavar="N",
                   help="streams one client connection may have open (default: %(default)s)")
    p.add_argument("--insecure-backend", action="store_true",
                   help="allow a --backend that other hosts reach without --curve-keys: anyone reaching it "
                        "becomes a worker and receives clients' audio")
    add_curve_argument(p, "accept only clients whose public key is in DIR/authorized/ (or DIR/admins/) and workers "
                          "whose key is in DIR/workers/")
    p.set_defaults(func=run_broker)


def run_broker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        keys = curve_keys(args.curve_keys, server=True)
        keys = curve_keys(args.curve_keys, server=True, role="workers")
    except CurveKeyError as e:
        print(f"rtsr broker: {e}", file=sys.stderr)
        return 2
    if keys is None and beyond_loopback(args.backend):
        if not args.insecure_backend:
            print(f"rtsr broker: --backend {args.backend} reaches beyond this host without --curve-keys: anyone "
                  "who connects there becomes a worker and receives clients' audio. Use --curve-keys DIR (workers "
                  "connect with DIR's worker key), a loopback or ipc:// backend, or --insecure-backend.",
                  file=sys.stderr)
            return 2
        log.warning("WARNING: rtsr broker: --insecure-backend: any process reaching %s can register as a worker "
                    "and receive clients' audio", args.backend)
    warn_if_open(args.frontend, keys, "rtsr broker")
    try:
        Broker(args.frontend, args.backend, Transport(hwm=args.hwm, max_frame_bytes=args.max_frame_bytes,
                                                      name="rtsr broker", curve=keys),
               args.max_frame_bytes, args.worker_timeout, args.max_streams_per_client).run()
    except zmq.ZMQError as e:
        print(f"rtsr broker: {e}", file=sys.stderr)
        return 2
    return 0
