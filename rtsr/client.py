"""A client for `rtsr serve` / `rtsr broker`, and `rtsr filter`, which streams a file through one.

    with Client("tcp://127.0.0.1:5557") as c:
        c.open("mic", sr=16000)
        c.send("mic", block)                 # seq numbers are counted for you
        for r in c.replies(timeout=1.0):     # Reply(header, audio) in the order the server sent them
            ...
        y = c.upscale(x, 16000)              # or all of it: a whole signal through one stream

    rtsr filter call.wav call_48k.wav --connect tcp://127.0.0.1:5557 [--realtime]

One DEALER socket carries any number of streams; replies come back in the order of the messages
they answer, so a stream's audio needs no reordering. `upscale` keeps a bounded number of blocks
in flight, which is what keeps a fast sender from queueing without limit on either side.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from rtsr import protocol as P
from rtsr.audio_io import FORMATS, AudioError, check_writable, decode_audio, readable, write_audio
from rtsr.audio_spec import SR
from rtsr.curve import CurveKeyError, add_curve_argument
from rtsr.curve import curve_keys as load_curve_keys
from rtsr.cutoff import cutoff_arg
from rtsr.transport import send_parts


class ServerError(Exception):
    """An error reply: `code` is the protocol's error code, `header` the whole reply header."""

    def __init__(self, header: dict[str, Any]):
        super().__init__(f"{header.get('code')}: {header.get('message')}")
        self.code, self.header = header.get("code"), header


@dataclass
class Reply:
    """One reply: its header and, for audio replies, the 48 kHz samples as (frames, channels)."""

    header: dict[str, Any]
    audio: np.ndarray | None = None

    @property
    def type(self) -> str:
        return self.header.get("type", "")

    @property
    def stream(self) -> P.StreamId:
        return self.header.get("stream")


RESEND_CODES = (P.RATE, P.BUSY)  # refusals of one audio block: send it again later


class Client:
    """One connection to a service (or broker), any number of streams over it."""

    def __init__(self, endpoint: str = P.DEFAULT_ENDPOINT, timeout: float = 10.0, hwm: int = 64,
                 curve_keys: str | Path | None = None, curve_role: str = "client"):
        """curve_keys: a folder from `rtsr keygen` (client.key_secret, server.key) for a service
        started with --curve-keys; without it such a service never answers (a TimeoutError).
        curve_role "admin" connects with the admin pair, which may also ask for `stats`."""
        self.endpoint, self.timeout = endpoint, timeout
        keys = load_curve_keys(curve_keys, server=False, role=curve_role)
        self._why_silent = (f" (is {keys.folder}/server.key that service's, and this {curve_role} key in its "
                            f"authorised folder? Its log names refused keys)" if keys else
                            " (a service started with --curve-keys answers only clients with keys: --curve-keys DIR)")
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        if keys is not None:
            keys.make_client(self.sock, curve_role)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.connect(endpoint)
        self._streams: dict[P.StreamId, tuple[int, str]] = {}  # stream -> (channels, wire dtype)
        self._seq: dict[P.StreamId, int] = {}
        self._tokens: dict[P.StreamId, str] = {}  # from `opened`: every later message of the stream carries it
        self._pending: deque[Reply] = deque()
        self.counts: Counter[str] = Counter()  # upscale(): blocks sent, resent, answered; errors by code

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Close the socket at once (unsent messages are dropped)."""
        self.sock.close(0)
        self._ctx.term()

    # --- messages ---------------------------------------------------------------------------

    def send_raw(self, header: dict[str, Any], pcm: bytes | None = None) -> None:
        """Any header and PCM as they are: for tests and tools that speak the protocol themselves."""
        send_parts(self.sock, P.encode(header, pcm))

    def open(self, stream: P.StreamId, sr: int, channels: int = 1, dtype: str = "float32",
             model: str | None = None, hop_ms: float | None = None, cutoff: float | None = None,
             fill_holes: bool = False) -> dict[str, Any]:
        """Open a stream and wait for `opened` (returned); raises ServerError if refused.
        cutoff: where the input's band ends (Hz); None lets the service find it. fill_holes: the
        audio was decoded from a lossy codec, whose holes below the band the service fills."""
        h: dict[str, Any] = {"type": "open", "stream": stream, "sr": sr, "channels": channels, "dtype": dtype}
        if cutoff is not None:
            h["cutoff"] = cutoff
        if fill_holes:
            h["fill_holes"] = True
        if model is not None:
            h["model"] = model
        if hop_ms is not None:
            h["hop_ms"] = hop_ms
        self._streams[stream] = (channels, dtype)
        self._seq[stream] = 0
        self.send_raw(h)
        r = self._take(lambda r: r.stream == stream and r.type in ("opened", "error"))
        if r.type == "error":
            raise ServerError(r.header)
        self._tokens[stream] = r.header.get("token")
        return r.header

    def token(self, stream: P.StreamId) -> str | None:
        """The stream's token, which `send_raw` headers for it must carry."""
        return self._tokens.get(stream)

    def send(self, stream: P.StreamId, block: np.ndarray, seq: int | None = None) -> int:
        """Send one block ((frames,) or (frames, channels); float in [-1, 1) or the wire dtype).

        Returns its seq: the next one unless given (skipping ahead makes the server fill a gap).
        """
        channels, dtype = self._streams[stream]
        seq = self._seq[stream] if seq is None else seq
        self._seq[stream] = seq + 1
        self.send_raw({"type": "audio", "stream": stream, "token": self._tokens.get(stream), "seq": seq},
                      to_wire(block, dtype, channels))
        return seq

    def close(self, stream: P.StreamId) -> None:
        """Ask for the tail; it arrives as an audio reply with "final": true, then `closed`."""
        self.send_raw({"type": "close", "stream": stream, "token": self._tokens.get(stream)})

    def stats(self) -> dict[str, Any]:
        """The service's counters: for an admin key (curve_role "admin"), or on loopback without CURVE."""
        self.send_raw({"type": "stats"})
        r = self._take(lambda r: r.type == "stats" or r.type == "error" and r.header.get("code") == P.FORBIDDEN)
        if r.type == "error":
            raise ServerError(r.header)
        return r.header

    def recv(self, timeout: float | None = None) -> Reply:
        """The next reply (error replies included, not raised); TimeoutError after `timeout` s."""
        if self._pending:
            return self._pending.popleft()
        return self._recv_socket(self.timeout if timeout is None else timeout)

    def _recv_socket(self, timeout: float) -> Reply:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply from {self.endpoint} within {timeout:g} s{self._why_silent}")
        frames = self.sock.recv_multipart()
        h = P.decode_header(frames[0])
        sid = h.get("stream")
        audio = None
        if h["type"] == "audio":
            channels = self._streams.get(sid, (1, ""))[0]
            audio = P.pcm_to_array(frames[1] if len(frames) > 1 else b"", channels)
        if (h["type"] == "closed" or h.get("closed")) and h.get("token") in (None, self._tokens.get(sid)):
            self._streams.pop(sid, None)
        return Reply(h, audio)

    def replies(self, timeout: float | None = None) -> Iterator[Reply]:
        """Replies as they come, until none arrives for `timeout` seconds."""
        while True:
            try:
                yield self.recv(timeout)
            except TimeoutError:
                return

    def _take(self, want: Callable[[Reply], bool], timeout: float | None = None) -> Reply:
        """The first reply matching `want`; the others stay queued for recv() in their order."""
        for i, r in enumerate(self._pending):
            if want(r):
                del self._pending[i]
                return r
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            r = self._recv_socket(max(deadline - time.monotonic(), 0.0))
            if want(r):
                return r
            self._pending.append(r)

    # --- whole signals ----------------------------------------------------------------------

    def upscale(self, x: np.ndarray, sr: int, stream: P.StreamId = "upscale", block_ms: float = 20.0,
                realtime: bool = False, window: int = 16, model: str | None = None,
                dtype: str = "float32", cutoff: float | None = None, fill_holes: bool = False) -> np.ndarray:
        """A whole (frames,) or (frames, channels) signal through one stream -> 48 kHz, same layout.

        At most `window` blocks are unanswered at a time (the flow control that keeps a fast
        sender from queueing without bound); with `realtime`, each block is sent when its last
        sample would have arrived from a live source. A block refused with `rate` or `busy` is sent
        again after its retry_after_ms, with every block after it (the server refuses those until
        it comes: docs/protocol.md). Raises ServerError on this stream's other errors
        (`worker_lost`, `not_reading`, ...: the stream is gone; reopen to go on).
        """
        mono = np.ndim(x) == 1
        x2 = np.asarray(x)[:, None] if mono else np.asarray(x)
        self.open(stream, sr, x2.shape[1], dtype, model, cutoff=cutoff, fill_holes=fill_holes)
        block = max(round(sr * block_ms / 1000), 1)
        starts = range(0, len(x2), block)

        def mine(r: Reply) -> bool:
            return r.stream == stream

        out: list[np.ndarray] = []
        t0, sent, answered, not_before, high = time.monotonic(), 0, 0, 0.0, 0
        while answered < len(starts):
            if sent < len(starts) and sent - answered < window:
                due = t0 + min(starts[sent] + block, len(x2)) / sr - time.monotonic() if realtime else 0.0
                due = max(due, not_before - time.monotonic())
                if due <= 0:
                    self.send(stream, x2[starts[sent]:starts[sent] + block], seq=sent)
                    self.counts["resent" if sent < high else "sent"] += 1
                    sent += 1
                    high = max(high, sent)
                    continue
                try:
                    r = self._take(mine, due)
                except TimeoutError:
                    continue
            else:
                r = self._take(mine)
            if r.type == "error":
                self.counts[f"error {r.header.get('code')}"] += 1
            if r.type == "error" and r.header.get("code") in RESEND_CODES and r.header.get("seq") is not None:
                if r.header["seq"] == answered:  # go back: resend from the refused block, after the wait
                    sent = answered
                    not_before = time.monotonic() + r.header.get("retry_after_ms", 10) / 1000
                continue  # a later block of the same refused flight: resent anyway
            done = self._collect(r, out)
            answered += done
            self.counts["answered"] += done
        self.close(stream)
        while (r := self._take(mine)).type != "closed":
            self._collect(r, out)
        y = np.concatenate(out) if out else np.zeros((0, x2.shape[1]), np.float32)
        return y[:, 0] if mono else y

    @staticmethod
    def _collect(r: Reply, out: list[np.ndarray]) -> int:
        """Keep a stream's audio; raise its errors; returns 1 for an answered block."""
        if r.type == "error":
            raise ServerError(r.header)
        if r.type == "audio":
            out.append(r.audio)
            return 0 if r.header.get("final") else 1
        return 0


def to_wire(block: np.ndarray, dtype: str, channels: int) -> bytes:
    """A block as the stream's wire PCM; float input is scaled to int16 where that is the wire dtype."""
    x = np.asarray(block)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != channels:
        raise ValueError(f"expected (frames, {channels}) audio, got shape {np.shape(block)}")
    wire = P.DTYPES[dtype]
    if wire.kind == "i" and x.dtype.kind == "f":
        x = np.clip(np.round(x * 32768.0), -32768, 32767)
    return np.ascontiguousarray(x, wire).tobytes()


# --- rtsr filter --------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "filter", help="stream a file through a running `rtsr serve` or `rtsr broker`",
        description="Send IN through a running service block by block and write the 48 kHz result to OUT.")
    p.add_argument("input", type=Path, metavar="IN")
    p.add_argument("output", type=Path, metavar="OUT", help=f"a .{' or .'.join(FORMATS)} file")
    p.add_argument("--connect", default=P.DEFAULT_ENDPOINT, help="service endpoint (default: %(default)s)")
    p.add_argument("--realtime", action="store_true", help="pace blocks in real time, like a live source")
    p.add_argument("--block-ms", type=float, default=20.0, help="block length (default: %(default)s)")
    p.add_argument("--model", help="model name the service has loaded (default: the service's)")
    p.add_argument("--cutoff", type=cutoff_arg, default=None, metavar="auto|HZ",
                   help="where the input's real band ends (default: auto, found by the service as it streams)")
    p.add_argument("--keep-holes", action="store_true",
                   help="keep a lossy IN's (MP3, Vorbis, Opus) codec holes below its band (default: the service "
                        "fills them from the model)")
    p.add_argument("--dtype", choices=tuple(P.DTYPES), default="float32", help="wire PCM (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_curve_argument(p, "connect with DIR/client.key_secret to a service holding DIR/server.key")
    p.set_defaults(func=run_filter)


def run_filter(args: argparse.Namespace) -> int:
    fmt = args.output.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        print(f"rtsr filter: OUT must end in {' or '.join('.' + f for f in FORMATS)}", file=sys.stderr)
        return 2
    try:
        check_writable(args.output, args.overwrite)
        x, sr, lossy = decode_audio(readable(args.input), args.input)
        t0 = time.monotonic()
        with Client(args.connect, args.timeout, curve_keys=args.curve_keys) as c:
            y = c.upscale(x, sr, stream=args.input.name, block_ms=args.block_ms, realtime=args.realtime,
                          model=args.model, dtype=args.dtype, cutoff=args.cutoff,
                          fill_holes=lossy and not args.keep_holes)
        wall = time.monotonic() - t0
        args.output.parent.mkdir(parents=True, exist_ok=True)
        clipped = write_audio(args.output, y, SR, fmt, args.overwrite)
    except CurveKeyError as e:
        print(f"rtsr filter: {e}", file=sys.stderr)
        return 2
    except (AudioError, ServerError, TimeoutError, ValueError) as e:
        print(f"rtsr filter: {e}", file=sys.stderr)
        return 1
    note = f"; {clipped} samples clipped" if clipped else ""
    print(f"{args.input} -> {args.output} ({len(x) / sr:.2f} s in {wall:.2f} s{note})")
    return 0
