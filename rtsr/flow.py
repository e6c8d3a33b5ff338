"""Flow control for the ZeroMQ loops: no reply is dropped because ZeroMQ's queue was momentarily full.

ZeroMQ's ROUTER drops or refuses a message to a peer whose queue is at its high-water mark; a
client that sends a burst and then reads (a file filter, a reconnecting client) used to be dropped
for it. Here (the zguide's answer: stop reading a peer's requests while its replies cannot be sent,
with a bounded per-peer reply buffer):

- replies that ZeroMQ will not take yet wait in the peer's own queue, in order, and go out as soon
  as it reads;
- while a peer has replies waiting, its new requests are held, not processed (so a fast sender
  cannot make the server produce replies without bound);
- a peer that truly stops reading is dropped only past a documented bound: more than
  `max_unsent_bytes` of replies plus held requests, or none of its replies taken for `max_stall_s`
  seconds. Its streams are then closed and it is told (`not_reading`) when it reads again.

`FairShare` then orders what is admitted: each round a peer's requests may make the engine run
at most `share_s` seconds of audio (deficit round robin, each request costed by its length); the
rest wait, in order, for later rounds, so a peer sending heavy blocks slows itself, not others.

Socket-free: the loops give it a `send(peer, frames) -> "sent" | "full" | "gone"` function and an
injectable clock, so it is tested without sockets.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

SendResult = Literal["sent", "full", "gone"]
Msg = Any  # whatever the loop receives: held requests are returned as they came


@dataclass(frozen=True)
class FlowLimits:
    """The documented bound past which a client that does not read is dropped (docs/protocol.md)."""

    max_unsent_bytes: int = 64 * 1024 * 1024  # unsent replies + held requests, per peer
    max_stall_s: float = 10.0  # a peer with waiting replies that takes none for this long
    share_s: float = 0.25  # audio seconds (summed over channels) of one peer's requests run per round


def _size(frames: list) -> int:
    return sum(len(f) if isinstance(f, bytes | bytearray) else memoryview(f).nbytes for f in frames)


@dataclass
class _Peer:
    replies: deque[list] = field(default_factory=deque)
    held: deque[tuple[Msg, int]] = field(default_factory=deque)  # (request, its bytes)
    bytes: int = 0  # replies + held requests
    stalled_since: float | None = None  # since when its first waiting reply has waited
    dropped: bool = False  # dropped: its notices wait for it to read, its requests are no longer held


class FlowControl:
    """Per-peer reply queues and held requests for one socket."""

    def __init__(self, send: Callable[[bytes, list], SendResult], limits: FlowLimits | None = None,
                 clock: Callable[[], float] = time.monotonic, on_gone: Callable[[bytes], None] | None = None):
        self.send, self.limits, self.clock, self.on_gone = send, limits or FlowLimits(), clock, on_gone
        self.peers: dict[bytes, _Peer] = {}

    # --- replies ----------------------------------------------------------------------------

    def put(self, peer: bytes, frames: list) -> None:
        """Send now if nothing of this peer's is waiting and ZeroMQ takes it; else queue it."""
        p = self.peers.get(peer)
        if p is None or not p.replies:
            result = self.send(peer, frames)
            if result == "sent":
                return
            if result == "gone":
                self._gone(peer)
                return
            p = self.peers.setdefault(peer, _Peer())
            p.stalled_since = self.clock()
        p.replies.append(frames)
        p.bytes += _size(frames)

    def flush(self) -> None:
        """Send what ZeroMQ now takes, per peer in order, stopping at a peer's first refusal."""
        for peer, p in list(self.peers.items()):
            while p.replies:
                result = self.send(peer, p.replies[0])
                if result == "full":
                    break
                if result == "gone":
                    self._gone(peer)
                    break
                p.bytes -= _size(p.replies.popleft())
                p.stalled_since = self.clock() if p.replies else None
            if peer in self.peers and not p.replies and not p.held:
                del self.peers[peer]

    def waiting_bytes(self, peer: bytes) -> int:
        """Bytes of replies and held requests waiting for one peer."""
        p = self.peers.get(peer)
        return p.bytes if p is not None else 0

    def waiting(self) -> bool:
        """True while any reply is queued (the loop should come back soon to flush it)."""
        return any(p.replies for p in self.peers.values())

    def unsent(self, peer: bytes) -> list[list]:
        """The replies waiting for a peer (what a drop would leave it without)."""
        p = self.peers.get(peer)
        return list(p.replies) if p is not None else []

    def take_held(self, peer: bytes) -> list[Msg]:
        """A peer's held requests, forgotten here (the caller answers each, e.g. on its drop)."""
        p = self.peers.get(peer)
        if p is None:
            return []
        held = [msg for msg, _ in p.held]
        p.held.clear()
        return held

    # --- requests ---------------------------------------------------------------------------

    def admit(self, msgs: list[tuple[bytes, Msg, int]]) -> list[Msg]:
        """(peer, message, bytes) as received -> the messages to process now, in order.

        A peer with replies waiting has its messages held (in order); once its replies are out,
        its held messages come back here first, before anything newer of its own. A dropped
        peer's are not held: answered at once (its streams are gone), the answers queue behind
        the notices of its drop.
        """
        ready: list[Msg] = []
        for peer, p in list(self.peers.items()):
            if p.held and not p.replies:
                ready += [msg for msg, _ in p.held]
                del self.peers[peer]
        for peer, msg, n in msgs:
            p = self.peers.get(peer)
            if p is not None and not p.dropped and (p.replies or p.held):
                p.held.append((msg, n))
                p.bytes += n
            else:
                ready.append(msg)
        return ready

    # --- bounds -----------------------------------------------------------------------------

    def overdue(self) -> list[tuple[bytes, str]]:
        """Peers past the bound, with the reason to tell them; the caller drops their streams and
        calls `dropped` (which forgets what was queued for them)."""
        now, out = self.clock(), []
        for peer, p in list(self.peers.items()):
            if p.dropped:  # its notices wait until it reads or goes, unless it piles up answers past the bound
                if p.bytes > self.limits.max_unsent_bytes:
                    del self.peers[peer]
            elif p.bytes > self.limits.max_unsent_bytes:
                out.append((peer, f"{p.bytes / 2**20:.1f} MiB of replies and requests waiting for a client that "
                                  f"does not read (bound {self.limits.max_unsent_bytes / 2**20:g} MiB)"))
            elif p.stalled_since is not None and now - p.stalled_since > self.limits.max_stall_s:
                out.append((peer, f"no reply taken for {now - p.stalled_since:.1f} s "
                                  f"(bound {self.limits.max_stall_s:g} s)"))
        return out

    def dropped(self, peer: bytes, notices: list[list]) -> None:
        """Forget a dropped peer's queue and held requests; `notices` (messages saying why) wait
        for it to read (or its connection to go)."""
        self.peers.pop(peer, None)
        if notices:
            p = self.peers[peer] = _Peer(stalled_since=self.clock(), dropped=True,
                                         bytes=sum(_size(n) for n in notices))
            p.replies.extend(notices)

    def _gone(self, peer: bytes) -> None:
        self.peers.pop(peer, None)
        if self.on_gone is not None:
            self.on_gone(peer)


class FairShare:
    """Deficit round robin over peers: per round, each peer's requests run up to `share_s` seconds
    of audio (summed over channels); a heavier request waits until its peer's credit reaches it."""

    def __init__(self, limits: FlowLimits | None = None):
        limits = limits or FlowLimits()
        self.share_s, self.max_bytes = limits.share_s, limits.max_unsent_bytes
        self.queues: dict[bytes, deque[tuple[Msg, int, float]]] = {}
        self.credit: dict[bytes, float] = {}
        self.bytes: dict[bytes, int] = {}

    def add(self, peer: bytes, msg: Msg, n: int, cost: float) -> None:
        self.queues.setdefault(peer, deque()).append((msg, n, cost))
        self.bytes[peer] = self.bytes.get(peer, 0) + n

    def take(self) -> list[Msg]:
        """This round's requests, peer after peer, each peer's in the order they came."""
        ready: list[Msg] = []
        for peer, q in list(self.queues.items()):
            credit = self.credit.get(peer, 0.0) + self.share_s
            while q and q[0][2] <= credit:
                msg, n, cost = q.popleft()
                credit -= cost
                self.bytes[peer] -= n
                ready.append(msg)
            if q:
                self.credit[peer] = credit
            else:
                self._forget(peer)
        return ready

    def waiting(self) -> bool:
        return bool(self.queues)

    def overdue(self) -> list[tuple[bytes, str]]:
        """Peers whose waiting requests are past the byte bound: they send faster than they are served."""
        return [(peer, f"{n / 2**20:.1f} MiB of requests waiting to be served (bound {self.max_bytes / 2**20:g} MiB)")
                for peer, n in self.bytes.items() if n > self.max_bytes]

    def take_all(self, peer: bytes) -> list[Msg]:
        """A peer's waiting requests, forgotten here."""
        q = self.queues.get(peer, ())
        self._forget(peer)
        return [msg for msg, _, _ in q]

    def _forget(self, peer: bytes) -> None:
        for d in (self.queues, self.credit, self.bytes):
            d.pop(peer, None)
