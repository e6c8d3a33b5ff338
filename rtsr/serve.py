"""`rtsr serve`: the streaming engine as a ZeroMQ service (docs/protocol.md is the wire contract).

    rtsr serve                                      # ROUTER on tcp://127.0.0.1:5557, clients use DEALER
    rtsr serve --pull tcp://host:5555 --push tcp://host:5556      # pipeline stage (PULL -> PUSH)
    rtsr serve --connect-broker tcp://host:5560     # a worker behind `rtsr broker`

`Service` is the protocol logic with no sockets in it (one engine `Stream` per (client, stream
id), sequence and gap bookkeeping, limits, expiry); the three `serve_*` loops only move frames
between sockets and it. One thread does everything, so the engine runs with one torch thread and
no locks, and a bad message can only ever produce an error reply to its own sender.

Batching: each poll round hands all the messages that are waiting to `Service.handle_batch`,
which turns consecutive audio messages into a list of `Job`s and runs them in `_run_jobs`: in
waves of one block per stream, every stream's ready hop goes into one model call per sampler step
(`rtsr.batch`, caches stacked along the batch axis), full-band passthrough streams included.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from rtsr import protocol as P
from rtsr.backends import BACKENDS
from rtsr.batch import StepFailed
from rtsr.batch import step as batch_step
from rtsr.cli import device_name, positive_int
from rtsr.curve import CurveKeyError, CurveKeys, add_curve_argument, curve_keys, peer_is_admin, warn_if_open
from rtsr.cutoff import Band
from rtsr.engine import Stream
from rtsr.features import SR
from rtsr.flow import FairShare, FlowControl
from rtsr.kernels.intake import all_finite
from rtsr.model import ModelError
from rtsr.transport import (
    FLUSH_S,
    MAX_DROPPED_REMEMBERED,
    POLL_S,
    Peer,
    Transport,
    asks_stats,
    attach,
    buffers,
    dealer_sender,
    drain,
    nbytes,
    not_reading_notices,
    own_routing_ids,
    pipeline_endpoint,
    poll_s,
    router_sender,
    send_parts,
)
from rtsr.upscaler import Upscaler

log = logging.getLogger("rtsr.serve")

Reply = tuple[Peer, list[bytes]]
HEARTBEAT_S = 1.0  # worker -> broker "ready" interval
BROKER = b"broker"  # a worker's one peer, for its flow control


@dataclass
class Limits:
    """What one client may cost the service; all enforced per message, before the engine runs."""

    max_streams: int = 64
    max_streams_per_peer: int = 16  # one connection's share, so one peer cannot hold every slot
    max_frame_bytes: int = P.MAX_FRAME_BYTES
    idle_timeout: float = 30.0  # seconds without a message before a stream is dropped
    max_speed: float = 0.0  # audio seconds per wall second a stream may send (0: as fast as it is served)
    burst_s: float = 2.0  # audio a rate-limited stream may be ahead of real time
    # audio one message may make the engine run, in seconds summed over channels, gap silence
    # included: what bounds the time one message holds everyone else's streams
    max_block_s: float = 1.0


@dataclass
class Session:
    """One open stream: its engine and the bookkeeping that keeps its timeline intact."""

    spec: P.OpenSpec
    engine: Stream
    token: str  # the stream answers only messages carrying it
    opened: float
    active: float
    next_seq: int = 0
    last_frames: int = 0  # length of the last block: a gap is filled with this much silence per missing block
    audio_s: float = 0.0  # input seconds accepted, for the rate limit
    band: Band | None = None  # the band last reported to the client
    resend_from: int | None = None  # a refused (rate) seq: later ones are refused too until it comes again
    reply_start: bytes = b""  # its audio replies' header up to the seq (`P.audio_header_start`)

    def work_s(self, pcm_bytes: int) -> float:
        """Seconds of audio, summed over channels, in a PCM frame of this length (nothing decoded)."""
        return P.pcm_frames(pcm_bytes, self.spec.dtype, self.spec.channels) * self.spec.channels / self.spec.sr


@dataclass
class Job:
    """One audio message, validated and sequenced, waiting for the engine."""

    peer: Peer
    key: tuple[Peer, P.StreamId]
    session: Session
    block: np.ndarray  # (frames, channels) float32, gap silence already in front
    seq: int
    extra: dict[str, Any]  # the reply header's fields after the seq ("gap", and the band when it moved)


@dataclass
class Stats:
    messages: int = 0
    errors: int = 0
    gaps: int = 0
    expired: int = 0
    dropped_peers: int = 0
    opened: int = 0
    closed: int = 0


class Service:
    """The protocol state machine: frames in, replies out; never raises for a client's mistake."""

    def __init__(self, upscalers: dict[str, Upscaler], default_model: str, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if default_model not in upscalers:
            raise ValueError(f"default model {default_model!r} is not among the loaded ones")
        self.upscalers, self.default_model = upscalers, default_model
        self.limits, self.clock = limits or Limits(), clock
        self.sessions: dict[tuple[Peer, P.StreamId], Session] = {}
        self.dropped: dict[tuple[Peer, P.StreamId], str] = {}  # why a stream was dropped, told on its next message
        self.stats = Stats()
        self.tokens = True  # later messages must carry their stream's token (off for a pipeline's one upstream)
        self._costed: dict[bytes, dict[str, Any]] = {}  # headers `cost` decoded, taken by the next `handle_batch`

    # --- entry points -----------------------------------------------------------------------

    def handle_batch(self, msgs: Iterable[tuple[Peer, list]], admins: Collection[Peer] = ()) -> list[Reply]:
        """Replies to every message, in order; consecutive audio messages become one batch of jobs.
        `admins`: the peers allowed `stats` (an admin key, or loopback without CURVE)."""
        out: list[Reply] = []
        jobs: list[Job] = []
        for peer, frames in msgs:
            self.stats.messages += 1
            try:
                P.check_sizes(frames, self.limits.max_frame_bytes)
                raw = bytes(frames[0])
                h = self._costed.pop(raw, None) or P.decode_header(raw)
                if h["type"] == "audio":
                    jobs.append(self._audio_job(peer, h, frames))
                    continue
                self._run_jobs(jobs, out)  # a control message sees the state after all audio before it
                out += self._control(peer, h, frames, peer in admins)
            except P.ProtocolError as e:
                self._run_jobs(jobs, out)
                out.append(self._error(peer, e))
            except Exception as e:  # a bug met by one message must not end the service
                log.exception("message from %r failed", peer)
                self._run_jobs(jobs, out)
                out.append(self._error(peer, P.ProtocolError(P.INTERNAL, f"the server failed on this message: "
                                                                         f"{type(e).__name__}")))
        self._run_jobs(jobs, out)
        self._costed.clear()  # what fair sharing holds back is decoded again when its turn comes
        return out

    def cost(self, peer: Peer, frames: list) -> float:
        """Seconds of audio (summed over channels) an audio message asks the engine for, judged by
        its length; what fair sharing between peers counts. Anything else costs nothing."""
        if len(frames[0]) > P.MAX_HEADER_BYTES:
            return 0.0
        try:
            raw = bytes(frames[0])
            h = self._costed[raw] = P.decode_header(raw)
        except P.ProtocolError:
            return 0.0
        s = self.sessions.get((peer, h.get("stream")))
        if h.get("type") != "audio" or s is None or len(frames) < 2:
            return 0.0
        return s.work_s(len(frames[1]))

    def expire(self) -> list[Reply]:
        """Drop streams idle for longer than the idle timeout; tell their clients (best effort)."""
        now, out = self.clock(), []
        for key, s in list(self.sessions.items()):
            if now - s.active > self.limits.idle_timeout:
                del self.sessions[key]
                self.stats.expired += 1
                out.append(self._error(key[0], P.ProtocolError(
                    P.EXPIRED, f"stream idle for more than {self.limits.idle_timeout:g} s", key[1], closed=True,
                    token=s.token)))
        return out

    def drop_peer(self, peer: Peer, reason: str | None = None) -> list[P.ProtocolError]:
        """Forget every stream of a client that vanished, or (with a reason) stopped reading its
        replies: then each of those streams answers its next message with `not_reading` and the
        reason. Returns the `not_reading` notice of each stream dropped."""
        keys = [k for k in self.sessions if k[0] == peer]
        notices = []
        for k in keys:
            s = self.sessions.pop(k)
            if reason is not None:
                self.dropped[k] = reason
            notices.append(P.ProtocolError(P.NOT_READING, f"stream dropped: {reason or 'client went away'}", k[1],
                                           closed=True, token=s.token))
        while len(self.dropped) > MAX_DROPPED_REMEMBERED:
            del self.dropped[next(iter(self.dropped))]
        if keys:
            self.stats.dropped_peers += 1
        return notices

    # --- messages ---------------------------------------------------------------------------

    def _error(self, peer: Peer, e: P.ProtocolError) -> Reply:
        self.stats.errors += 1
        log.debug("error to %r: %s %s", peer, e.code, e.message)
        return peer, P.encode(e.header())

    def _session(self, peer: Peer, h: dict[str, Any]) -> tuple[tuple[Peer, P.StreamId], Session]:
        key = (peer, h.get("stream"))
        s = self.sessions.get(key)
        if s is None and key in self.dropped:
            raise P.ProtocolError(P.NOT_READING, f"stream {key[1]!r} was dropped: {self.dropped[key]}", key[1],
                                  h.get("seq"), closed=True)
        if s is None:
            raise P.ProtocolError(P.UNKNOWN_STREAM, f"no open stream {key[1]!r} (open it first)", key[1],
                                  h.get("seq"), closed=True)
        if self.tokens and h.get("token") != s.token:
            raise P.ProtocolError(P.BAD_TOKEN, f"the token does not match stream {key[1]!r}'s (the one `opened` "
                                               "gave)", key[1], h.get("seq"))
        return key, s

    def _no_pcm(self, h: dict[str, Any], frames: list) -> None:
        if len(frames) > 1 and len(frames[1]):
            raise P.ProtocolError(P.BAD_PCM, f"a {h['type']!r} message carries no PCM frame", h.get("stream"),
                                  closed=h["type"] == "open")

    def _control(self, peer: Peer, h: dict[str, Any], frames: list, admin: bool) -> list[Reply]:
        kind, sid = h["type"], h.get("stream")
        if kind == "open":
            return [(peer, P.encode(self._open(peer, h, frames)))]
        if kind in ("close", "cancel"):
            self._no_pcm(h, frames)
            key, s = self._session(peer, h)
            del self.sessions[key]
            self.stats.closed += 1
            out = []
            if kind == "close":
                try:
                    tail = s.engine.flush()
                except Exception as e:  # an engine bug must not take the service down
                    log.exception("flush failed for %r", key)
                    raise P.ProtocolError(P.INTERNAL, f"flush failed: {e}", sid, closed=True, token=s.token) from e
                out.append((peer, P.encode({"type": "audio", "stream": sid, "token": s.token, "final": True}, tail)))
            return out + [(peer, P.encode({"type": "closed", "stream": sid, "token": s.token}))]
        if kind == "stats":
            if not admin:
                raise P.ProtocolError(P.FORBIDDEN, "stats are for an admin key (or loopback without CURVE)", sid)
            return [(peer, P.encode({"type": "stats", "streams": len(self.sessions),
                                     "max_streams": self.limits.max_streams, "models": sorted(self.upscalers),
                                     **vars(self.stats)}))]
        raise P.ProtocolError(P.UNKNOWN_TYPE, f"unknown message type {kind!r}", sid)

    def _open(self, peer: Peer, h: dict[str, Any], frames: list) -> dict[str, Any]:
        key = (peer, h.get("stream"))
        if key in self.sessions:  # before any other check: a refusal must not say "closed" of an open stream
            raise P.ProtocolError(P.DUPLICATE_STREAM, f"stream {key[1]!r} is already open", key[1])
        self._no_pcm(h, frames)
        spec = P.parse_open(h)
        lim = self.limits
        if len(self.sessions) >= lim.max_streams:
            raise P.ProtocolError(P.BUSY, f"the service is at its limit of {lim.max_streams} streams",
                                  spec.stream, closed=True)
        if sum(k[0] == peer for k in self.sessions) >= lim.max_streams_per_peer:
            raise P.ProtocolError(P.BUSY, f"this connection has its share of {lim.max_streams_per_peer} streams "
                                          "open", spec.stream, closed=True)
        name = spec.model or self.default_model
        up = self.upscalers.get(name)
        if up is None:
            raise P.ProtocolError(P.UNKNOWN_MODEL, f"model {name!r} is not loaded here; loaded: "
                                                   f"{', '.join(sorted(self.upscalers))}", spec.stream, closed=True)
        try:
            engine = up.stream(spec.sr, spec.channels, spec.hop_ms, spec.cutoff, spec.fill_holes)
        except ValueError as e:  # e.g. a hop that is not a multiple of the frame hop
            raise P.ProtocolError(P.BAD_HEADER, str(e), spec.stream, closed=True) from None
        now, token = self.clock(), P.new_token()
        self.sessions[key] = Session(spec, engine, token, now, now, band=engine.band,
                                     reply_start=P.audio_header_start(spec.stream, token))
        self.stats.opened += 1
        return {"type": "opened", "stream": spec.stream, "token": token, "out_sr": SR,
                "latency_samples": engine.latency_samples, "channels": spec.channels, "model": name,
                "hop_ms": spec.hop_ms, **band_fields(engine.band)}

    def _audio_job(self, peer: Peer, h: dict[str, Any], frames: list) -> Job:
        """Validate, rate-check and sequence one audio message; the engine has not run yet."""
        key, s = self._session(peer, h)
        try:
            return self._sequence(peer, key, s, h, frames)
        except P.ProtocolError as e:
            e.extra["token"] = s.token
            raise

    def _sequence(self, peer: Peer, key: tuple[Peer, P.StreamId], s: Session, h: dict[str, Any],
                  frames: list) -> Job:
        sid, seq, lim, sr, channels = key[1], h.get("seq"), self.limits, s.spec.sr, s.spec.channels
        if seq is None:
            raise P.ProtocolError(P.BAD_HEADER, "an audio message needs a seq", sid)
        pcm = frames[1] if len(frames) > 1 else b""
        if s.work_s(len(pcm)) > lim.max_block_s:  # judged by length, before decoding
            n = P.pcm_frames(len(pcm), s.spec.dtype, channels)
            raise P.ProtocolError(P.TOO_BIG, f"a block of {n / sr:.3f} s x {channels} channels is more than the "
                                             f"{lim.max_block_s:g} s of audio one message may carry; block not "
                                             "consumed", sid, seq)
        x = P.decode_pcm(pcm, s.spec.dtype, channels, sid, seq, all_finite)
        now = self.clock()
        s.active = now
        if seq < s.next_seq:
            raise P.ProtocolError(P.SEQ, f"seq {seq} is old: expected {s.next_seq} (block dropped)", sid, seq)
        if lim.max_speed > 0:
            ahead = s.audio_s + len(x) / sr - lim.burst_s - lim.max_speed * (now - s.opened)
            if s.resend_from is not None and seq > s.resend_from:  # go-back-N: nothing past the refused block
                ahead = max(ahead, 0.001 * lim.max_speed)
            if ahead > 0:
                s.resend_from = seq if s.resend_from is None else s.resend_from
                raise P.ProtocolError(P.RATE, f"stream is sending faster than {lim.max_speed:g}x real time; "
                                              f"block not consumed, resend from seq {s.resend_from}", sid, seq,
                                      retry_after_ms=int(1000 * ahead / lim.max_speed) + 1,
                                      resend_from=s.resend_from)
            s.resend_from = None
        extra: dict[str, Any] = {}
        n, gap = len(x), seq - s.next_seq
        if gap:  # fill the missing blocks with silence so everything after keeps its time
            fill = gap * (s.last_frames or n)
            if (fill + n) * channels > lim.max_block_s * sr:
                del self.sessions[key]
                raise P.ProtocolError(P.SEQ, f"{gap} blocks missing ({fill / sr:.2f} s) is more silence than one "
                                             f"message may fill ({lim.max_block_s:g} s of audio over all "
                                             "channels); stream ended", sid, seq, closed=True)
            x = np.concatenate([np.zeros((fill, channels), np.float32), x])
            extra["gap"] = gap
            self.stats.gaps += gap
        s.next_seq = seq + 1
        s.last_frames = n or s.last_frames
        s.audio_s += len(x) / sr
        return Job(peer, key, s, x, seq, extra)

    def _run_jobs(self, jobs: list[Job], out: list[Reply]) -> None:
        """The engine stage of a batch; empties `jobs` into `out`, replies in job order.

        In waves of at most one block per stream: each wave's blocks are pushed, then every
        stream's ready hops run as one model call per sampler step (rtsr.batch), so N streams
        cost about one stream's dispatch. A stream whose engine fails is dropped with an error;
        if the batched call itself fails (an engine bug), the wave's streams go on one by one to
        find the culprit, and the others keep being served."""
        replies: dict[int, Reply] = {}
        pending = list(enumerate(jobs))
        while pending:
            wave, rest, seen = [], [], set()
            for i, job in pending:
                (rest if job.key in seen else wave).append((i, job))
                seen.add(job.key)
            pushed = [(i, job) for i, job in wave if self._push(job, i, replies)]
            for (i, job), y in zip(pushed, self._step([job for _, job in pushed], replies, [i for i, _ in pushed]),
                                   strict=True):
                if y is not None:
                    replies[i] = self._audio_reply(job, y)
            pending = rest
        out += [replies[i] for i in sorted(replies)]
        jobs.clear()

    def _push(self, job: Job, i: int, replies: dict[int, Reply]) -> bool:
        if self.sessions.get(job.key) is not job.session:
            return False  # dropped by an earlier job's failure
        try:
            job.session.engine.push(job.block)
            return True
        except Exception as e:  # an engine bug must not take the service down
            replies[i] = self._engine_failed(job, e)
            return False

    def _step(self, jobs: list[Job], replies: dict[int, Reply], ids: list[int]) -> list[np.ndarray | None]:
        """Every job's stream one round further, batched; a stream whose part fails gets an error
        and is dropped, the others get their samples as if alone (rtsr.batch holds them)."""
        try:
            return batch_step([job.session.engine for job in jobs])
        except StepFailed as failure:
            return [self._failed_or_held(job, i, failure.failed.get(k), replies)
                    for k, (job, i) in enumerate(zip(jobs, ids, strict=True))]
        except Exception:  # the model call itself: no stream moved; each alone finds the culprit
            log.exception("batched step failed; running the wave's streams one by one")
        outs: list[np.ndarray | None] = []
        for job, i in zip(jobs, ids, strict=True):
            try:
                outs.append(job.session.engine.feed(np.zeros((0, job.session.spec.channels), np.float32)))
            except Exception as e:
                replies[i] = self._engine_failed(job, e)
                outs.append(None)
        return outs

    def _failed_or_held(self, job: Job, i: int, error: Exception | None,
                        replies: dict[int, Reply]) -> np.ndarray | None:
        if error is not None:
            replies[i] = self._engine_failed(job, error)
            return None
        held = job.session.engine.take_ready()
        return np.concatenate(held) if held else np.zeros((0, job.session.spec.channels), np.float32)

    def _engine_failed(self, job: Job, e: Exception) -> Reply:
        log.error("engine failed for %r: %s", job.key, e)
        self.sessions.pop(job.key, None)
        return self._error(job.peer, P.ProtocolError(P.INTERNAL, f"engine failed: {e}", job.key[1],
                                                     job.seq, closed=True, token=job.session.token))

    def _audio_reply(self, job: Job, y: np.ndarray) -> Reply:
        band = job.session.engine.band
        if band != job.session.band:  # the cutoff in use moved: say so on this reply
            job.extra.update(band_fields(band))
            job.session.band = band
        return job.peer, [P.audio_header(job.session.reply_start, job.seq, job.extra),
                          P.pcm_bytes(y)]


def band_fields(band: Band) -> dict[str, Any]:
    """The cutoff in use, as `opened` and audio replies carry it."""
    return {"cutoff": round(band.hz, 1), "band": band.source}


# --- serving loops --------------------------------------------------------------------------------


def serve_router(service: Service, endpoint: str = P.DEFAULT_ENDPOINT, t: Transport | None = None) -> None:
    """Serve clients on a bound ROUTER until `t.stop` is set, with flow control (rtsr.flow): a
    client's replies wait for it to read, its requests wait while they do, each round runs every
    client's fair share of requests, and only a client past the documented bound is dropped (told
    `not_reading`, naming the blocks it will get no reply for)."""
    t = t or Transport()
    ctx = zmq.Context()
    sock = t.socket(ctx, zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable client raises instead of silently dropping
    fair = FairShare(t.flow)
    flow = FlowControl(router_sender(sock), t.flow, on_gone=lambda peer: _gone(service, fair, peer))
    try:
        with t.authenticator(ctx):
            t.ready({"router": attach(sock, endpoint, True)})
            while not t.stop.is_set():
                flow.flush()
                wait = FLUSH_S if fair.waiting() else poll_s(flow)
                msgs = own_routing_ids(drain(sock) if sock.poll(int(wait * 1000)) else [], flow.put)
                ready = flow.admit([(m[0].bytes, m, nbytes(m)) for m in msgs])
                for m in ready:
                    fair.add(m[0].bytes, m, nbytes(m), service.cost(m[0].bytes, buffers(m[1:])))
                taken = fair.take()
                admins = {m[0].bytes for m in taken if asks_stats(m[1:]) and peer_is_admin(m[1], t.curve)}
                batch = [(m[0].bytes, buffers(m[1:])) for m in taken]
                for peer, frames in service.handle_batch(batch, admins) + service.expire():
                    flow.put(peer, frames)
                for peer, reason in dict(fair.overdue() + flow.overdue()).items():  # once per peer
                    _drop_slow(service, flow, fair, peer, reason)
    finally:
        sock.close(0)
        ctx.term()


def _drop_slow(service: Service, flow: FlowControl, fair: FairShare, peer: Peer, reason: str) -> None:
    """Drop a client past the bound: each of its streams, and each block it will get no reply
    for (first and last seq, per stream), is told `not_reading` when it reads again."""
    streams = {e.stream: e for e in service.drop_peer(peer, reason)}
    notices = not_reading_notices(streams, flow.unsent(peer), flow.take_held(peer) + fair.take_all(peer), reason)
    log.warning("client %r is past the bound (%s): dropped %d streams", peer, reason, len(notices))
    flow.dropped(peer, notices)

def _gone(service: Service, fair: FairShare, peer: Peer) -> None:
    fair.take_all(peer)
    if n := len(service.drop_peer(peer)):
        log.info("client %r went away: dropped %d streams", peer, n)


def serve_pipeline(service: Service, pull: str, push: str, t: Transport | None = None) -> None:
    """Pipeline stage: PULL messages, PUSH replies (errors too, and to the log) downstream."""
    t = t or Transport()
    service.tokens = False  # one upstream, which never sees `opened`: it is the only sender there is
    ctx = zmq.Context()
    (pull_at, pull_bind), (push_at, push_bind) = pipeline_endpoint(pull), pipeline_endpoint(push)
    src, dst = t.socket(ctx, zmq.PULL, server=pull_bind), t.socket(ctx, zmq.PUSH, server=push_bind)
    try:
        with t.authenticator(ctx):
            t.ready({"pull": attach(src, pull_at, pull_bind), "push": attach(dst, push_at, push_bind)})
            while not t.stop.is_set():
                msgs = drain(src) if src.poll(int(POLL_S * 1000)) else []
                for _, frames in service.handle_batch([(b"", buffers(m)) for m in msgs], {b""}) + service.expire():
                    if json.loads(frames[0]).get("type") == "error":
                        log.warning("pipeline error: %s", frames[0].decode())
                    while not t.stop.is_set():  # downstream full or absent: wait (backpressure), but stay stoppable
                        if dst.poll(int(POLL_S * 1000), zmq.POLLOUT):
                            send_parts(dst, frames)
                            break
    finally:
        src.close(0)
        dst.close(0)
        ctx.term()


def serve_worker(service: Service, broker: str, t: Transport | None = None) -> None:
    """A worker behind `rtsr broker`: frames arrive as [client id, header, PCM] and go back the same way.

    "ready" messages (with an empty client frame), sent every HEARTBEAT_S between batches, register
    the worker and its capacity; the broker gives up on a worker silent for its --worker-timeout
    (dead or hung) and tells its clients. A "reset" from the broker (with an empty client frame:
    it has just taken this worker on) drops every stream, which belonged to a broker that has
    forgotten them. Replies the broker cannot take yet wait, in order (and new requests with
    them): none is ever dropped, so no stream is shifted. The broker's clients share the engine
    fairly (rtsr.flow.FairShare), each by its client id.
    """
    t = t or Transport()
    ctx = zmq.Context()
    sock = t.socket(ctx, zmq.DEALER, server=False, role="worker")
    flow, fair = FlowControl(dealer_sender(sock), t.flow), FairShare(t.flow)
    try:
        t.ready({"broker": attach(sock, broker, False)})
        beat = 0.0
        while not t.stop.is_set():
            flow.flush()
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                flow.put(BROKER, [b"", *P.encode({"type": "ready", "capacity": service.limits.max_streams,
                                                  "streams": len(service.sessions)})])
            wait = FLUSH_S if fair.waiting() else poll_s(flow)
            msgs = [m for m in (drain(sock) if sock.poll(int(wait * 1000)) else []) if len(m) >= 2]
            for m in flow.admit([(BROKER, m, nbytes(m)) for m in msgs]):
                if len(m[0]):
                    fair.add(m[0].bytes, m, nbytes(m), service.cost(m[0].bytes, buffers(m[1:])))
                elif _is_reset(m[1]):
                    for peer in {k[0] for k in service.sessions}:
                        service.drop_peer(peer)
                        fair.take_all(peer)
                    log.info("the broker took this worker on: earlier streams dropped")
            batch = [(m[0].bytes, buffers(m[1:])) for m in fair.take()]
            for peer, frames in service.handle_batch(batch) + service.expire():
                flow.put(BROKER, [peer, *frames])
    finally:
        sock.close(0)
        ctx.term()


def _is_reset(frame: zmq.Frame) -> bool:
    try:
        return P.decode_header(frame.buffer)["type"] == "reset"
    except P.ProtocolError:
        return False


# --- command line -------------------------------------------------------------------------------


def load_upscalers(names: list[str], device: str = "cpu", backend: str = "eager",
                   threads: int = 1) -> dict[str, Upscaler]:
    """Each --model under its argument and its folder name, so clients can say "basic" or "tiny";
    each warmed up, so the first stream does not wait for one-off allocation."""
    ups: dict[str, Upscaler] = {}
    for name in names:
        up = Upscaler.load(name, device, backend=backend, threads=threads, warm_up=True)
        ups[name] = up
        ups.setdefault(Path(name).name, up)
    return ups


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the streaming engine over ZeroMQ",
        description="Serve streams over ZeroMQ (protocol: docs/protocol.md). Default: a ROUTER socket that "
                    "DEALER clients talk to; --pull/--push: a pipeline stage; --connect-broker: a worker "
                    "behind `rtsr broker`.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--bind", default=P.DEFAULT_ENDPOINT, help="ROUTER endpoint (default: %(default)s)")
    mode.add_argument("--pull", metavar="ENDPOINT",
                      help="pipeline mode: read messages from here ('@' prefix binds, else connects)")
    mode.add_argument("--connect-broker", metavar="ENDPOINT", help="worker mode: the broker's backend")
    p.add_argument("--push", metavar="ENDPOINT", help="pipeline mode: send replies here ('@' prefix binds)")
    p.add_argument("--model", action="append", default=None,
                   help="model name or folder to load (repeatable; the first is the default; default: basic)")
    p.add_argument("--device", type=device_name, default="cpu", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="network execution backend (default auto: the fastest that works here)")
    p.add_argument("--max-streams", type=int, default=Limits.max_streams, help="(default: %(default)s)")
    p.add_argument("--max-streams-per-peer", type=int, default=Limits.max_streams_per_peer, metavar="N",
                   help="streams one client connection may have open (default: %(default)s)")
    p.add_argument("--max-block-s", type=float, default=Limits.max_block_s, metavar="S",
                   help="audio one message may carry, gap silence included, in seconds summed over its channels "
                        "(more is refused: too_big or a seq error; default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout, metavar="S",
                   help="drop a stream after this many seconds without a message (default: %(default)s)")
    p.add_argument("--max-frame-bytes", type=int, default=Limits.max_frame_bytes,
                   help="largest PCM frame answered (bigger ones get error too_big; default: %(default)s)")
    p.add_argument("--max-speed", type=float, default=Limits.max_speed, metavar="X",
                   help="refuse audio sent faster than X times real time with error 'rate' "
                        "(default: 0, no limit: a fast client is only slowed by the socket queues)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="CPU threads per model call (default 1: a few streams' matrices are small and more threads "
                        "only contend; a round of many streams on a machine with cores to spare may gain)")
    p.add_argument("--hwm", type=int, default=Transport.hwm, help="ZeroMQ high-water mark (default: %(default)s)")
    add_curve_argument(p, "with --bind, accept only clients whose public key is in DIR/authorized/; with "
                          "--connect-broker, connect to the broker as DIR/client.key")
    p.add_argument("-v", "--verbose", action="store_true", help="log every error reply")
    p.set_defaults(func=run_serve)


def serve_keys(args: argparse.Namespace) -> CurveKeys | None:
    """--curve-keys checked for the sides this mode plays: a bound socket is a CURVE server, a
    connected one (a worker to its broker, a pipeline end) a client."""
    if args.pull:
        binds = {pipeline_endpoint(e)[1] for e in (args.pull, args.push)}
    else:
        binds = {not args.connect_broker}
    keys = None
    for server in binds:
        keys = curve_keys(args.curve_keys, server, "worker" if args.connect_broker else None)
    return keys


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if bool(args.pull) != bool(args.push):
        print("rtsr serve: --pull and --push go together", file=sys.stderr)
        return 2
    try:
        keys = serve_keys(args)
    except CurveKeyError as e:
        print(f"rtsr serve: {e}", file=sys.stderr)
        return 2
    if not (args.pull or args.connect_broker):
        warn_if_open(args.bind, keys, "rtsr serve")
    names = args.model or ["basic"]
    try:
        ups = load_upscalers(names, args.device, args.backend, args.threads)
    except (ModelError, RuntimeError) as e:
        print(f"rtsr serve: {e}", file=sys.stderr)
        return 2
    gc.freeze()  # the models' objects stay: no full collection walks them again, so none stalls a round
    limits = Limits(max_streams=args.max_streams, max_streams_per_peer=args.max_streams_per_peer,
                    max_frame_bytes=args.max_frame_bytes, idle_timeout=args.idle_timeout, max_speed=args.max_speed,
                    max_block_s=args.max_block_s)
    service = Service(ups, names[0], limits)
    t = Transport(hwm=args.hwm, max_frame_bytes=args.max_frame_bytes, curve=keys)
    try:
        if args.pull:
            serve_pipeline(service, args.pull, args.push, t)
        elif args.connect_broker:
            serve_worker(service, args.connect_broker, t)
        else:
            serve_router(service, args.bind, t)
    except zmq.ZMQError as e:
        print(f"rtsr serve: {e}", file=sys.stderr)
        return 2
    return 0
