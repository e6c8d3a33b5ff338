"""The wire format of `rtsr serve`, `rtsr broker` and `rtsr.client` (docs/protocol.md says it in prose).

Every message is multipart: frame 0 a UTF-8 JSON object (the header), frame 1, where there is
one, raw little-endian interleaved PCM. This module is the only place that turns frames into
headers and arrays and back, so the service, the broker and the client cannot drift apart, and
every refusal is a `ProtocolError` carrying the code that goes back on the wire.

Sizes are checked before anything is decoded: a 100 MB frame is refused by its length alone.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtsr.audio_spec import all_finite, as_frames, check_rate
from rtsr.cutoff import given_band

VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
DTYPES = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}  # wire dtype -> little-endian numpy dtype
OUT_DTYPE = DTYPES["float32"]  # replies are always 48 kHz float32
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAME_BYTES = 4 * 1024 * 1024  # default PCM limit: 65 s of 16 kHz mono float32, 2.7 s of 384 kHz stereo
MAX_CHANNELS = 16
MAX_STREAM_ID = 256  # characters of a string stream id
MAX_JSON_DEPTH = 4  # headers are flat objects; deeper nesting is refused before anything walks it
MAX_JSON_BRACKETS = 64  # more opening brackets than this is refused unparsed (a nest of them costs the GC)
MAX_TOKEN = 64  # characters of a stream token
DEFAULT_HOP_MS = 20.0

# Error codes (the "code" of an error reply); docs/protocol.md explains each one.
BAD_JSON, BAD_HEADER, VERSION_MISMATCH, UNKNOWN_TYPE = "bad_json", "bad_header", "version", "unknown_type"
UNKNOWN_STREAM, DUPLICATE_STREAM, BAD_RATE, UNKNOWN_MODEL = "unknown_stream", "duplicate_stream", "bad_rate", \
    "unknown_model"
BAD_PCM, BAD_AUDIO, TOO_BIG, SEQ, RATE, BUSY = "bad_pcm", "bad_audio", "too_big", "seq", "rate", "busy"
EXPIRED, INTERNAL, NO_WORKER, WORKER_LOST = "expired", "internal", "no_worker", "worker_lost"
NOT_READING, BAD_TOKEN, FORBIDDEN = "not_reading", "bad_token", "forbidden"

StreamId = str | int | None


class ProtocolError(Exception):
    """A refused message: becomes one error reply to its sender and nothing else.

    `closed` says the server holds no stream of that id for the sender after this error, so a
    client (or the broker's routing table) can forget it.
    """

    def __init__(self, code: str, message: str, stream: StreamId = None, seq: int | None = None,
                 closed: bool = False, **extra: Any):
        super().__init__(message)
        self.code, self.message, self.stream, self.seq, self.closed, self.extra = code, message, stream, seq, \
            closed, extra

    def header(self) -> dict[str, Any]:
        h: dict[str, Any] = {"type": "error", "stream": self.stream, "code": self.code, "message": self.message}
        if self.seq is not None:
            h["seq"] = self.seq
        if self.closed:
            h["closed"] = True
        return {**h, **self.extra}


@dataclass(frozen=True)
class OpenSpec:
    """A validated `open`: what one engine stream needs."""

    stream: StreamId
    sr: int
    channels: int
    dtype: str
    model: str | None
    hop_ms: float
    cutoff: float | None = None  # where the input's band ends (Hz); None: found from the audio
    fill_holes: bool = False  # decoded from a lossy codec: its holes below the band are filled


def encode(header: dict[str, Any], pcm: np.ndarray | bytes | None = None) -> list[bytes]:
    """Header (+ PCM) -> frames; every header says which protocol version wrote it."""
    frames = [json.dumps({"v": VERSION, **header}, separators=(",", ":")).encode()]
    if pcm is not None:
        frames.append(pcm_bytes(pcm))
    return frames


def pcm_bytes(pcm: np.ndarray | bytes) -> bytes:
    """A PCM frame: bytes as they are, an array as OUT_DTYPE."""
    return pcm if isinstance(pcm, bytes) else np.ascontiguousarray(pcm, OUT_DTYPE).tobytes()


def audio_header_start(stream: StreamId, token: str | None) -> bytes:
    """An audio reply's header up to its seq's digits, encoded once per stream: `audio_header`
    finishes it for each block (a header encoded whole cost a server ~3 us a block)."""
    whole = encode({"type": "audio", "stream": stream, "token": token, "seq": 0})[0]
    return whole[:-len(b"0}")]


def audio_header(start: bytes, seq: int, extra: dict[str, Any] | None = None) -> bytes:
    """The bytes `encode` makes of an audio reply's header {type, stream, token, seq, **extra}."""
    end = json.dumps(extra, separators=(",", ":")).encode()[1:] if extra else b"}"
    return b"%s%d%s" % (start, seq, b"," + end if extra else end)


def check_sizes(frames: list, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
    """Refuse a message by its frame count and lengths alone, before any decoding."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(BAD_HEADER, f"expected 1 or 2 frames (header, PCM), got {len(frames)}")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(TOO_BIG, f"header of {len(frames[0])} bytes is over {MAX_HEADER_BYTES}")
    if len(frames) == 2 and len(frames[1]) > max_frame_bytes:
        raise ProtocolError(TOO_BIG, f"PCM frame of {len(frames[1])} bytes is over the limit of {max_frame_bytes}")


def decode_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Frame 0 -> a header dict with a known version; stream id and seq type-checked."""
    raw = bytes(frame)
    brackets = raw.count(b"[") + raw.count(b"{")  # an upper bound on the containers (strings may hold some)
    if brackets > MAX_JSON_BRACKETS:
        raise ProtocolError(BAD_JSON, f"header has more than {MAX_JSON_BRACKETS} brackets (headers are flat objects)")
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(BAD_JSON, f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(h, dict):
        raise ProtocolError(BAD_JSON, f"header must be a JSON object, got {type(h).__name__}")
    if brackets > MAX_JSON_DEPTH and _depth(h) > MAX_JSON_DEPTH:  # no deeper than its containers are many
        raise ProtocolError(BAD_JSON, f"header is nested more than {MAX_JSON_DEPTH} levels deep")
    sid = h.get("stream")
    if sid is not None and not (isinstance(sid, str) and len(sid) <= MAX_STREAM_ID
                                or isinstance(sid, int) and not isinstance(sid, bool)):
        raise ProtocolError(BAD_HEADER, f"stream id must be a string (<= {MAX_STREAM_ID} chars), "
                                        "an integer or null")
    if h.get("v", VERSION) != VERSION:
        raise ProtocolError(VERSION_MISMATCH, f"protocol version {h.get('v')!r} is not supported (this is "
                                              f"v{VERSION})", sid)
    if not isinstance(h.get("type"), str):
        raise ProtocolError(BAD_HEADER, "header has no string 'type'", sid)
    if "seq" in h and not _is_int(h["seq"], 0):
        raise ProtocolError(BAD_HEADER, "seq must be an integer >= 0", sid)
    token = h.get("token")
    if token is not None and not (isinstance(token, str) and len(token) <= MAX_TOKEN):
        raise ProtocolError(BAD_HEADER, f"token must be a string of at most {MAX_TOKEN} characters", sid)
    return h


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion (a hostile header may be deep)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                todo += [(c, d + 1) for c in (v.values() if isinstance(v, dict) else v)]
    return deepest


def new_token() -> str:
    """An unguessable stream token: a stream answers only messages that carry it."""
    return secrets.token_urlsafe(16)


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def parse_open(h: dict[str, Any]) -> OpenSpec:
    """An `open` header -> OpenSpec, or the error saying which field is wrong."""
    sid = h.get("stream")
    sr, channels, dtype = h.get("sr"), h.get("channels", 1), h.get("dtype", "float32")
    hop_ms = h.get("hop_ms", DEFAULT_HOP_MS)
    if not _is_int(sr, 1):
        raise ProtocolError(BAD_RATE, f"sr must be a positive integer, got {sr!r}", sid, closed=True)
    try:
        check_rate(sr)
    except ValueError as e:
        raise ProtocolError(BAD_RATE, str(e), sid, closed=True) from None
    if not _is_int(channels, 1) or channels > MAX_CHANNELS:
        raise ProtocolError(BAD_HEADER, f"channels must be 1..{MAX_CHANNELS}, got {channels!r}", sid, closed=True)
    if dtype not in DTYPES:
        raise ProtocolError(BAD_HEADER, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", sid,
                            closed=True)
    if not isinstance(hop_ms, int | float) or isinstance(hop_ms, bool) or not 0 < hop_ms <= 1000:
        raise ProtocolError(BAD_HEADER, f"hop_ms must be a number in (0, 1000], got {hop_ms!r}", sid, closed=True)
    model = h.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError(BAD_HEADER, "model must be a string", sid, closed=True)
    cutoff = h.get("cutoff")
    if cutoff == "auto":
        cutoff = None
    if cutoff is not None:
        if not isinstance(cutoff, int | float) or isinstance(cutoff, bool):
            raise ProtocolError(BAD_HEADER, f"cutoff must be 'auto' or a number of Hz, got {cutoff!r}", sid,
                                closed=True)
        try:
            given_band(cutoff, sr)
        except ValueError as e:
            raise ProtocolError(BAD_HEADER, str(e), sid, closed=True) from None
    fill_holes = h.get("fill_holes", False)
    if not isinstance(fill_holes, bool):
        raise ProtocolError(BAD_HEADER, f"fill_holes must be true or false, got {fill_holes!r}", sid, closed=True)
    return OpenSpec(sid, sr, channels, dtype, model, float(hop_ms), None if cutoff is None else float(cutoff),
                    fill_holes)


def decode_pcm(payload: bytes | memoryview, dtype: str, channels: int, stream: StreamId = None,
               seq: int | None = None, finite: Callable[[np.ndarray], bool] = all_finite) -> np.ndarray:
    """Frame 1 -> (frames, channels) float32, refusing a ragged length and NaN/Inf (via `as_frames`;
    finite: its check, which a server passes compiled, `rtsr.kernels.intake.all_finite`)."""
    dt = DTYPES[dtype]
    width = dt.itemsize * channels
    if len(payload) % width:
        raise ProtocolError(BAD_PCM, f"PCM of {len(payload)} bytes is not a whole number of {channels}-channel "
                                     f"{dtype} frames ({width} bytes each)", stream, seq)
    x = np.frombuffer(payload, dt).reshape(-1, channels)
    try:
        return as_frames(x, channels, finite)
    except ValueError as e:
        raise ProtocolError(BAD_AUDIO, str(e), stream, seq) from None


def pcm_to_array(payload: bytes | memoryview, channels: int) -> np.ndarray:
    """A reply's 48 kHz float32 PCM -> (frames, channels)."""
    return np.frombuffer(payload, OUT_DTYPE).reshape(-1, channels).astype(np.float32)


MAX_CAPACITY = 100_000  # streams a worker may announce


def parse_ready(h: dict[str, Any]) -> int:
    """A worker's `ready` heartbeat -> its capacity (streams), or the error saying why not."""
    capacity = h.get("capacity")
    if not _is_int(capacity, 0) or capacity > MAX_CAPACITY:
        raise ProtocolError(BAD_HEADER, f"capacity must be an integer in 0..{MAX_CAPACITY}, got {capacity!r}")
    return capacity


def pcm_frames(payload_bytes: int, dtype: str, channels: int) -> float:
    """Frames in a PCM frame of this many bytes, judged by length alone (before any decoding)."""
    return payload_bytes / (DTYPES[dtype].itemsize * channels)
