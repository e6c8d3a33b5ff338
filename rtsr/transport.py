"""The ZeroMQ side shared by `rtsr serve` and `rtsr broker`: sockets with bounded queues, CURVE,
bind/connect, draining, and flow-controlled senders. Torch-free, so the broker needs no engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from rtsr import protocol as P
from rtsr.curve import CurveKeys
from rtsr.flow import FlowControl, FlowLimits, SendResult

log = logging.getLogger("rtsr.serve")
Peer = bytes  # ZeroMQ routing identity of a client ("" in pipeline mode)
POLL_S = 0.05  # how often the loops look at their stop flag and at idle streams
FLUSH_S = 0.005  # poll interval while replies wait for a slow reader
MAX_BATCH = 64  # messages taken per poll round
MAX_DROPPED_REMEMBERED = 4096  # streams whose drop is told on their next message
RECV_BUDGET = 64 * 1024 * 1024  # bytes ZeroMQ may hold of one peer's unread requests (RCVHWM x largest message)
_ids_lock = threading.Lock()


@dataclass
class Transport:
    """What the serving loops share: socket limits (bounded queues, bounded messages) and control
    (a stop flag checked every POLL_S, a callback told the endpoints once bound, for tests and logs).

    Memory per peer is bounded in bytes at the socket: ZeroMQ drops the connection of a peer whose
    message is over `max_message_bytes` (twice the largest PCM frame answered, so a frame a little
    too big still gets its `too_big`), holds at most RECV_BUDGET of its unread requests, and at
    most `hwm` replies, each bounded by the service's per-message audio limit."""

    hwm: int = 64  # replies queued per peer before ZeroMQ pushes back (and flow control takes over)
    max_frame_bytes: int = P.MAX_FRAME_BYTES  # the largest PCM frame the service answers
    stop: threading.Event = field(default_factory=threading.Event)
    on_ready: Callable[[dict[str, str]], None] | None = None  # called with the bound endpoints
    name: str = "rtsr serve"  # for the log line
    curve: CurveKeys | None = None  # CURVE: encrypted, authorised peers only (rtsr.curve)
    flow: FlowLimits = field(default_factory=FlowLimits)  # when a client that does not read is dropped

    @property
    def max_message_bytes(self) -> int:
        return 2 * self.max_frame_bytes + P.MAX_HEADER_BYTES

    @property
    def recv_hwm(self) -> int:
        return max(4, min(self.hwm, RECV_BUDGET // self.max_message_bytes))

    def socket(self, ctx: zmq.Context, kind: int, server: bool = True, role: str | None = None) -> zmq.Socket:
        """A socket with the limits above; with CURVE keys, the server side of `role`'s domain
        ("clients" or "workers", checked through `authenticator`) or a client side as `role`
        ("client" or "worker")."""
        if kind == zmq.ROUTER:
            _unpredictable_routing_ids()
        s = ctx.socket(kind)
        if self.curve is not None:
            if server:
                self.curve.make_server(s, role or "clients")
            else:
                self.curve.make_client(s, role or "client")
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, self.recv_hwm)
        s.setsockopt(zmq.SNDHWM, self.hwm)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        # transport-level heartbeats run in ZeroMQ's I/O thread, so a peer busy computing is not
        # mistaken for a dead one, while a dead one is disconnected (then sends to it fail). The
        # timeout outlasts flow control's bound and the notice after it: a peer that only stops
        # reading (its socket stops taking the pings too) is told `not_reading`, not cut unasked.
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(1000 * (2 * self.flow.max_stall_s + 5)))
        return s

    def authenticator(self, ctx: zmq.Context) -> contextlib.ExitStack:
        """The ZAP handler that checks CURVE clients on ctx's server sockets, for the loop's life."""
        stack = contextlib.ExitStack()
        if self.curve is not None:
            stack.callback(self.curve.authenticator(ctx).stop)
        return stack

    def ready(self, endpoints: dict[str, str]) -> None:
        security = f"CURVE on, keys {self.curve.folder}" if self.curve else "no CURVE (plain TCP)"
        log.info("%s: %s (%s)", self.name, ", ".join(f"{k} {v}" for k, v in endpoints.items()), security)
        if self.on_ready:
            self.on_ready(endpoints)


def _unpredictable_routing_ids() -> None:
    """Seed the C library's rand(), from which libzmq draws the first routing id a ROUTER hands
    out (then +1 per peer). Unseeded, every process hands out 0x006b8b4567 first: a peer that
    connects under the next id makes the next client's connection abort the process (libzmq
    asserts on the collision). Seeded from the OS, the next id is a 1 in 2**32 guess."""
    with _ids_lock:
        ctypes.CDLL(None).srand(secrets.randbits(32))


def attach(sock: zmq.Socket, endpoint: str, bind: bool) -> str:
    """Bind or connect; returns the endpoint actually in use (a bound port 0/* becomes the real one)."""
    if bind:
        sock.bind(endpoint)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.connect(endpoint)
    return endpoint


def pipeline_endpoint(text: str) -> tuple[str, bool]:
    """'@tcp://...' binds, '>tcp://...' or plain connects (the CZMQ convention)."""
    if text.startswith("@"):
        return text[1:], True
    return text.removeprefix(">"), False


# pyzmq's send_multipart/recv_multipart build an enum flag for every part: ~4 us a message each
# way, against ~1.8 with plain int flags, of a server's ~20 us of work per stream and block
NOBLOCK, MORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)


def send_parts(sock: zmq.Socket, frames: list, flags: int = 0) -> None:
    """`sock.send_multipart(frames, flags)`, all or nothing as ZeroMQ sends a message."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        sock.send(f, flags | MORE if i < last else flags)


def recv_parts(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """`sock.recv_multipart(flags, copy=False)`: a message's parts arrive together, so only the
    first may find none (zmq.Again with NOBLOCK)."""
    parts = [sock.recv(flags, copy=False)]
    while parts[-1].more:
        parts.append(sock.recv(flags, copy=False))
    return parts


def drain(sock: zmq.Socket) -> list[list[zmq.Frame]]:
    msgs = []
    while len(msgs) < MAX_BATCH:
        try:
            msgs.append(recv_parts(sock, NOBLOCK))
        except zmq.Again:
            break
    return msgs


def buffers(frames: list[zmq.Frame]) -> list[memoryview]:
    return [f.buffer for f in frames]


def poll_s(flow: FlowControl) -> float:
    """Come back soon while replies wait for a slow reader; else at the stop-flag rate."""
    return FLUSH_S if flow.waiting() else POLL_S


def nbytes(frames: list[zmq.Frame]) -> int:
    return sum(len(f.buffer) for f in frames)


def router_sender(sock: zmq.Socket) -> Callable[[Peer, list], SendResult]:
    """ROUTER sends for FlowControl: "full" when ZeroMQ's queue to the peer is at its high-water
    mark, "gone" when the peer is disconnected (ROUTER_MANDATORY tells both apart)."""
    def send(peer: Peer, frames: list) -> SendResult:
        try:
            send_parts(sock, [peer, *frames], NOBLOCK)
            return "sent"
        except zmq.Again:
            return "full"
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return "gone"
    return send


def dealer_sender(sock: zmq.Socket) -> Callable[[Peer, list], SendResult]:
    def send(_: Peer, frames: list) -> SendResult:
        try:
            send_parts(sock, frames, NOBLOCK)
            return "sent"
        except zmq.Again:
            return "full"
    return send


def own_routing_ids(msgs: list[list[zmq.Frame]], refuse: Callable[[bytes, list], None]) -> list[list[zmq.Frame]]:
    """The messages of peers under a routing id the ROUTER chose (5 bytes, the first 0); a peer that
    set its own (ZMQ_ROUTING_ID) is refused each message, so no peer names itself after another."""
    kept = []
    for m in msgs:
        peer = m[0].bytes
        if len(peer) == 5 and peer[0] == 0:
            kept.append(m)
        else:
            refuse(peer, P.encode(P.ProtocolError(P.FORBIDDEN, "this connection set its own routing id "
                                                               "(ZMQ_ROUTING_ID): the service names connections, "
                                                               "connect without one").header()))
    return kept


def not_reading_notices(streams: dict[P.StreamId, P.ProtocolError | None], unsent: list[list], held: list[list],
                        reason: str) -> list[list[bytes]]:
    """What a client dropped past the bound is told: one `not_reading` per stream (`streams`, its
    notice or None for a plain one, and any other its waiting messages name), with seq..last_seq
    its blocks among the replies never sent (`unsent`, header first) and the requests never run
    (`held`, routing id first)."""
    def plain(sid: P.StreamId) -> P.ProtocolError:
        return P.ProtocolError(P.NOT_READING, f"stream dropped: {reason}", sid, closed=True)
    notices = {sid: e or plain(sid) for sid, e in streams.items()}
    for sid, (first, last) in unanswered([[b"", *r] for r in unsent] + held).items():
        e = notices.setdefault(sid, plain(sid))
        e.seq, e.extra["last_seq"] = first, last
    return [P.encode(e.header()) for e in notices.values()]


def asks_stats(frames: list[zmq.Frame]) -> bool:
    """Might this message be a `stats` request? A cheap look before the (costlier) admin check."""
    return bool(frames) and b'"stats"' in frames[0].bytes


def unanswered(msgs: list[list]) -> dict[P.StreamId, tuple[int, int]]:
    """Audio messages (requests held, or replies never sent) that leave a client without an answer
    -> per stream, the lowest and highest seq among them (they come from several queues)."""
    seqs: dict[P.StreamId, tuple[int, int]] = {}
    for m in msgs:
        try:
            h = P.decode_header(m[1])
        except (P.ProtocolError, IndexError):
            continue
        if h["type"] in ("audio", "error") and isinstance(h.get("seq"), int):
            first, last = seqs.get(h.get("stream"), (h["seq"], h["seq"]))
            seqs[h.get("stream")] = (min(first, h["seq"]), max(last, h["seq"]))
    return seqs
