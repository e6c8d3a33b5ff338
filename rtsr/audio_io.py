"""Audio files in and out, with one-line errors a batch can print and move past.

Reading returns float32 (frames, channels) exactly as stored: no normalisation, no dithering.
What libsndfile does not read (AAC/M4A, ALAC, a video's sound track) FFmpeg decodes
(rtsr.av_decode). Writing goes to a hidden temporary file beside the destination and is renamed
into place, so a crash, a full disk or an unwritable format never leaves a partial file under the
real name. The path "-" is standard input when read and standard output when written.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from rtsr.audio_spec import MAX_SR, MIN_SR, as_frames
from rtsr.av_decode import DecodeError, decode

FORMATS = {"wav": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_24")}  # fmt -> (container, subtype)
FLAC_MAX = 1.0 - 2.0**-23  # largest 24-bit PCM value: [-1, 1) is all it can hold
WAV_LIMIT = 0xFFFF0000  # RIFF sizes are 32-bit; bigger float data goes into RF64
# transform codecs whose encoders zero whole bands where bits run short (holes the engine fills)
LOSSY_SUBTYPES = frozenset({"MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "VORBIS", "OPUS"})
STDIO = Path("-")  # standard input as an input, standard output as an output


class AudioError(Exception):
    """A file that cannot be read or written; str() is one line: "<path>: <reason>".

    `reason` alone is kept for callers that already show the path (a batch's result line).
    """

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 samples and the rate, or AudioError saying what is wrong."""
    return decode_audio(readable(path), path)[:2]


def readable(path: str | Path) -> Path:
    """The path, if it is a file this process may read ("-": a copy of standard input); else
    AudioError saying why not."""
    p = Path(path)
    if p == STDIO:
        return stdin_copy()
    if not p.exists():
        raise AudioError(p, "no such file")
    if p.is_dir():
        raise AudioError(p, "is a folder, not an audio file")
    if not os.access(p, os.R_OK):
        raise AudioError(p, "no permission to read it")
    return p


@functools.cache
def stdin_copy() -> Path:
    """Standard input, read to its end once into a temporary file (removed at exit): a file is
    read twice (its band, then the upscale), and libsndfile and FFmpeg need to seek."""
    fd, name = tempfile.mkstemp(prefix="rtsr-stdin-")
    atexit.register(os.unlink, name)
    with os.fdopen(fd, "wb") as f:
        shutil.copyfileobj(sys.stdin.buffer, f)
    return Path(name)


def decode_audio(source: Path | BinaryIO, name: str | Path) -> tuple[np.ndarray, int, bool]:
    """read_audio's decoding, also of a file's bytes (a file-like object) sent from elsewhere;
    `name` is what errors call it. The third value: it was coded lossily (LOSSY_SUBTYPES, or a
    lossy codec FFmpeg decoded)."""
    try:
        f = sf.SoundFile(source)
    except (sf.SoundFileError, RuntimeError, TypeError) as e:
        if not isinstance(source, Path):
            source.seek(0)
        got = _decode_with_ffmpeg(source, name, e)
        return _checked(Path(name), np.array(got.samples), got.sr), got.sr, got.lossy
    with f:
        sr, lossy = f.samplerate, f.subtype in LOSSY_SUBTYPES
        try:
            x = f.read(dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as e:
            raise AudioError(name, f"corrupt or truncated audio ({_reason(e)})") from e
    return _checked(Path(name), x, sr), sr, lossy


def _reason(e: Exception) -> str:
    return str(getattr(e, "error_string", None) or e).strip().rstrip(".")


def _decode_with_ffmpeg(source: Path | BinaryIO, name: str | Path, refused: Exception):
    """What libsndfile refused (`refused`), decoded by FFmpeg; if FFmpeg cannot either, the
    error gives libsndfile's reason (a WAV or FLAC's problem reads best in its words), except
    where it says the file is not there (its words for a .mp3 with no MPEG frames in it): the
    file was found, so FFmpeg's reason is the true one."""
    try:
        return decode(source)
    except DecodeError as e:
        reason = _reason(refused)
        if not reason or "does not exist" in reason:
            reason = str(e)
        raise AudioError(name, f"not a readable audio file ({reason})") from e


def _checked(p: Path, x: np.ndarray, sr: int) -> np.ndarray:
    """Refuse what the engine cannot use, before any model time is spent on it."""
    if len(x) == 0:
        raise AudioError(p, "empty (0 audio frames)")
    if not MIN_SR <= sr <= MAX_SR:
        raise AudioError(p, f"sample rate {sr} Hz is outside {MIN_SR}..{MAX_SR}")
    try:
        return as_frames(x, x.shape[1])
    except ValueError as e:  # NaN/Inf samples
        raise AudioError(p, str(e)) from e


def check_writable(path: str | Path, overwrite: bool = False) -> None:
    """Refuse to replace an existing file unless asked: checked before any compute, and again on write."""
    if Path(path) != STDIO and Path(path).exists() and not overwrite:
        raise AudioError(path, "already exists (use --overwrite to replace it)")


def write_audio(path: str | Path, y: np.ndarray, sr: int, fmt: str = "wav", overwrite: bool = False) -> int:
    """Write (frames,) or (frames, channels) audio atomically; returns how many samples were clipped.

    wav is 32-bit float: levels above full scale survive, so nothing is ever clipped. flac is
    24-bit PCM, which holds [-1, 1) only; samples outside are clipped and counted so the caller
    can say so.
    """
    y = np.asarray(y, dtype=np.float32)
    y2 = y[:, None] if y.ndim == 1 else y
    with AudioWriter(path, sr, y2.shape[1], fmt, overwrite, len(y2)) as w:
        w.write(y2)
        w.commit()
    return w.clipped


class AudioWriter:
    """A file written block by block into a hidden temporary beside the destination and renamed
    into place by commit(): a crash, a full disk or an error midway never leaves a partial file
    under the real name (leaving the block without commit() removes the temporary). To "-" it is
    written whole to standard output by commit() (a WAV's header needs its length first)."""

    def __init__(self, path: str | Path, sr: int, channels: int, fmt: str = "wav", overwrite: bool = False,
                 expected_frames: int = 0):
        self.dest, self.fmt, self.overwrite, self.clipped = Path(path), fmt, overwrite, 0
        if fmt not in FORMATS:
            raise AudioError(self.dest, f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        check_writable(self.dest, overwrite)
        container, subtype = FORMATS[fmt]
        if fmt == "wav" and expected_frames * channels * 4 > WAV_LIMIT:
            container = "RF64"  # RIFF sizes are 32-bit
        if self.dest == STDIO:
            fd, name = tempfile.mkstemp(prefix="rtsr-stdout-")
            os.close(fd)
            self.tmp = Path(name)
        else:
            self.tmp = self.dest.with_name(f".{self.dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            self.f = sf.SoundFile(self.tmp, "w", sr, channels, subtype=subtype, format=container)
        except (sf.SoundFileError, RuntimeError, ValueError, OSError) as e:
            self.tmp.unlink(missing_ok=True)
            raise AudioError(self.dest, f"cannot write {fmt} ({_reason(e)})") from e

    def write(self, y: np.ndarray) -> None:
        """Append (frames, channels) float32; flac clips to [-1, 1) and counts what it clipped."""
        if self.fmt == "flac":
            self.clipped += int(np.count_nonzero((y < -1.0) | (y > FLAC_MAX)))
            y = np.clip(y, -1.0, FLAC_MAX)
        try:
            self.f.write(y)
        except (sf.SoundFileError, RuntimeError, ValueError, OSError) as e:
            raise AudioError(self.dest, f"cannot write {self.fmt} ({_reason(e)})") from e

    def commit(self) -> None:
        try:
            self.f.close()
            if self.dest == STDIO:
                with open(self.tmp, "rb") as f:
                    shutil.copyfileobj(f, sys.stdout.buffer)
                sys.stdout.buffer.flush()
                return
            check_writable(self.dest, self.overwrite)  # again: something may have appeared meanwhile
            os.replace(self.tmp, self.dest)
        except (sf.SoundFileError, RuntimeError, OSError) as e:
            raise AudioError(self.dest, f"cannot write {self.fmt} ({_reason(e)})") from e

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(self, *exc: object) -> None:  # also on KeyboardInterrupt
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


class AudioReader:
    """An input file checked like read_audio and read in (frames, channels) float32 blocks, as
    often as wanted (a file is scanned for its band, then upscaled), in bounded memory. `lossy`:
    it is coded by a transform codec (LOSSY_SUBTYPES, rtsr.av_decode's LOSSY_CODECS), whose holes
    the engine may fill.

    MP3 is decoded once, by a single read, into an anonymous temporary file: libsndfile 1.2's MPEG
    decoder corrupts about 1,550 samples after every read boundary (errors up to 0.6 in 4096-frame
    reads, measured against a whole-file read and against the encoder's input), so an MP3 read in
    blocks would carry a glitch per block, which also hides its band edge. What libsndfile does
    not read, FFmpeg decodes the same way, once and whole (rtsr.av_decode).
    """

    def __init__(self, path: str | Path):
        self.path, self.file = Path(path), readable(path)  # the name errors give; what is read ("-": a copy)
        self._decoded: np.ndarray | None = None
        try:
            info = sf.info(str(self.file))
        except (sf.SoundFileError, RuntimeError, TypeError) as e:
            got = _decode_with_ffmpeg(self.file, self.path, e)
            self._decoded, self.sr, self.lossy = got.samples, got.sr, got.lossy
            self.frames, self.channels = got.samples.shape
            self._whole_read = True
        else:
            self.sr, self.channels, self.frames = info.samplerate, info.channels, info.frames
            self.lossy = info.subtype in LOSSY_SUBTYPES
            self._whole_read = info.format == "MP3"
        if self.frames <= 0:
            raise AudioError(self.path, "empty (0 audio frames)")
        if not MIN_SR <= self.sr <= MAX_SR:
            raise AudioError(self.path, f"sample rate {self.sr} Hz is outside {MIN_SR}..{MAX_SR}")

    def blocks(self, frames: int = 1 << 18) -> Iterator[np.ndarray]:
        if self._whole_read:
            data = self._decode_once()
            for i in range(0, len(data), frames):
                yield _checked(self.path, np.array(data[i:i + frames]), self.sr)
            return
        try:
            with sf.SoundFile(self.file) as f:
                while len(x := f.read(frames, dtype="float32", always_2d=True)):
                    yield _checked(self.path, x, self.sr)
        except (sf.SoundFileError, RuntimeError) as e:
            raise AudioError(self.path, f"corrupt or truncated audio ({_reason(e)})") from e

    def _decode_once(self) -> np.ndarray:
        """The whole file decoded by one read into a disk-backed array (freed with the reader)."""
        if self._decoded is None:
            store = np.memmap(tempfile.TemporaryFile(), np.float32, "w+", shape=(self.frames, self.channels))
            try:
                with sf.SoundFile(self.file) as f:
                    n = len(f.read(out=store))
            except (sf.SoundFileError, RuntimeError) as e:
                raise AudioError(self.path, f"corrupt or truncated audio ({_reason(e)})") from e
            if n == 0:
                raise AudioError(self.path, "empty (0 audio frames)")
            self._decoded = store[:n]
        return self._decoded
