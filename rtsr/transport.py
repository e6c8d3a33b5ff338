"""The ZeroMQ side shared by `rtsr serve` and `rtsr broker`: sockets with bounded queues, CURVE,
bind/connect, draining, and flow-controlled senders. Torch-free, so the broker needs no engine.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from rtsr.curve import CurveKeys
from rtsr.flow import FlowControl, FlowLimits, SendResult

log = logging.getLogger("rtsr.serve")
Peer = bytes  # ZeroMQ routing identity of a client ("" in pipeline mode)
POLL_S = 0.05  # how often the loops look at their stop flag and at idle streams
FLUSH_S = 0.005  # poll interval while replies wait for a slow reader
MAX_BATCH = 64  # messages taken per poll round
MAX_DROPPED_REMEMBERED = 4096  # streams whose drop is told on their next message


@dataclass
class Transport:
    """What the serving loops share: socket limits (bounded queues, bounded messages) and control
    (a stop flag checked every POLL_S, a callback told the endpoints once bound, for tests and logs)."""

    hwm: int = 64  # messages queued per peer, each way, before ZeroMQ pushes back
    max_message_bytes: int = 128 * 1024 * 1024  # above this ZeroMQ drops the connection (no reply possible)
    stop: threading.Event = field(default_factory=threading.Event)
    on_ready: Callable[[dict[str, str]], None] | None = None  # called with the bound endpoints
    name: str = "rtsr serve"  # for the log line
    curve: CurveKeys | None = None  # CURVE: encrypted, authorised peers only (rtsr.curve)
    flow: FlowLimits = field(default_factory=FlowLimits)  # when a client that does not read is dropped

    def socket(self, ctx: zmq.Context, kind: int, server: bool = True) -> zmq.Socket:
        """A socket with the limits below; with CURVE keys, the server side (authenticating peers
        through `authenticator`) or the client side of the handshake."""
        s = ctx.socket(kind)
        if self.curve is not None:
            (self.curve.make_server if server else self.curve.make_client)(s)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, self.hwm)
        s.setsockopt(zmq.SNDHWM, self.hwm)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        # transport-level heartbeats run in ZeroMQ's I/O thread, so a peer busy computing is not
        # mistaken for a dead one, while a dead one is disconnected (then sends to it fail)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        return s

    def authenticator(self, ctx: zmq.Context) -> contextlib.ExitStack:
        """The ZAP handler that checks CURVE clients on ctx's server sockets, for the loop's life."""
        stack = contextlib.ExitStack()
        if self.curve is not None:
            stack.callback(self.curve.authenticator(ctx).stop)
        return stack

    def ready(self, endpoints: dict[str, str]) -> None:
        log.info("%s: %s", self.name, ", ".join(f"{k} {v}" for k, v in endpoints.items()))
        if self.on_ready:
            self.on_ready(endpoints)


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


def drain(sock: zmq.Socket) -> list[list[zmq.Frame]]:
    msgs = []
    while len(msgs) < MAX_BATCH:
        try:
            msgs.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
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
            sock.send_multipart([peer, *frames], zmq.NOBLOCK)
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
            sock.send_multipart(frames, zmq.NOBLOCK)
            return "sent"
        except zmq.Again:
            return "full"
    return send
