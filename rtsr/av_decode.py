"""What libsndfile cannot read, decoded by FFmpeg through PyAV: AAC/M4A, ALAC, and the audio
track of a video (MP4, MOV, WebM, MKV).

The whole track is decoded once, in order, into a disk-backed float32 array: FFmpeg's decoders
are exact only when run from the start, and the file is read twice (its band, then the upscale).
The encoder's priming samples are dropped by FFmpeg, its end padding here (cut at the length the
container states), so the samples line up with the source's and the length is the source's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import BinaryIO

import numpy as np

# FFmpeg's decoders of transform codecs whose encoders zero bands where bits run short
LOSSY_CODECS = frozenset({"aac", "aac_fixed", "aac_latm", "mp3", "mp3float", "mp2", "mp2float", "vorbis",
                          "libvorbis", "opus", "libopus", "ac3", "eac3", "wmav1", "wmav2"})


class DecodeError(Exception):
    """FFmpeg could not open or decode it; str() is the reason, for the caller's AudioError."""


@dataclass
class Decoded:
    samples: np.ndarray  # (frames, channels) float32, disk-backed
    sr: int
    codec: str  # FFmpeg's decoder name, e.g. "aac"

    @property
    def lossy(self) -> bool:
        return self.codec in LOSSY_CODECS


def decode(source: Path | BinaryIO) -> Decoded:
    """The first audio track of a file (or a file-like object), whole, at its own rate."""
    try:
        import av
    except ImportError as e:  # a dependency; only a broken install lacks it
        raise DecodeError(f"PyAV is not installed ({e}): pip install av") from e
    try:
        with av.open(str(source) if isinstance(source, Path) else source, "r") as container:
            if not container.streams.audio:
                raise DecodeError("no audio track")
            return _decode_track(container, container.streams.audio[0])
    except av.FFmpegError as e:
        raise DecodeError(str(getattr(e, "strerror", None) or e).strip().rstrip(".")) from e


def duration_s(path: Path) -> float:
    """The first audio track's length as its container states it, without decoding (0 if unknown)."""
    import av

    try:
        with av.open(str(path), "r") as container:
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            return (container.duration or 0) / av.time_base
    except (av.FFmpegError, IndexError):
        return 0.0


def _decode_track(container, stream) -> Decoded:
    import av

    ctx = stream.codec_context
    sr, channels = ctx.sample_rate, ctx.channels
    if not sr or not channels:
        raise DecodeError("audio track with no sample rate or channels")
    to_float = av.AudioResampler(format="flt", layout=ctx.layout, rate=sr)  # packed float32, as decoded
    store, frames = tempfile.TemporaryFile(), 0
    for frame in chain(container.decode(stream), [None]):  # None: the resampler's last samples
        for out in to_float.resample(frame):
            block = out.to_ndarray().reshape(-1, channels)
            store.write(block.tobytes())
            frames += len(block)
    if stream.duration and stream.time_base:  # the stated length: the encoder's end padding cut
        frames = min(frames, round(stream.duration * stream.time_base * sr))
    if frames == 0:
        return Decoded(np.zeros((0, channels), np.float32), sr, ctx.name)
    store.flush()
    return Decoded(np.memmap(store, np.float32, "r", shape=(frames, channels)), sr, ctx.name)
