"""The public API: load a model once, then upscale whole signals or open streams.

    up = Upscaler.load("basic", device="cpu")
    y = up.upscale(x, sr)                     # offline: the stream below, fed at once
    s = up.stream(input_sr=16000, channels=1, hop_ms=20)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from rtsr.audio_spec import SR, as_frames, check_rate
from rtsr.backends import apply_backend
from rtsr.cutoff import Band, as_band, scan_band
from rtsr.engine import Stream
from rtsr.model import SuperResModel, load_model
from rtsr.offline import OFFLINE_BLOCK, OFFLINE_HOP_MS, Signal, upscale_signals

WARM_UP_S = 1.6  # a warm-up stream's audio: its band tracker decides by ~1.4 s whatever its turn


def known_device(device: str) -> bool:
    """Whether `device` names one: auto, cpu, cuda or cuda:N (one GPU of several: a server per GPU)."""
    return device in ("auto", "cpu", "cuda") or device.startswith("cuda:") and device[5:].isdigit()


def resolve_device(device: str) -> str:
    """auto, cpu, cuda or cuda:N as torch's device name; anything else, or cuda without a CUDA
    device, is refused in words a caller can act on (torch's own errors list its device types)."""
    if not known_device(device):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but PyTorch sees no CUDA device here; use 'cpu' or 'auto'")
    return device


class Upscaler:
    def __init__(self, model: SuperResModel, seed: int = 0, workers: int = 1):
        """workers: threads `upscale` runs a signal's segments on (rtsr.offline; the output is the
        same bits for any count), each with its own share of the model's calls."""
        self.model, self.seed, self.workers = model, seed, workers

    @classmethod
    def load(cls, name_or_path: str = "basic", device: str = "cpu", steps: int | None = None, seed: int = 0,
             backend: str = "auto", threads: int | None = 1, warm_up: bool = False, workers: int = 1) -> Upscaler:
        """A bundled model by name ("basic", "speech") or a model directory, ready to run: the one
        way every command loads one. backend: rtsr.backends (auto: the fastest that works here);
        threads: torch's (process-wide) and ONNX Runtime's CPU threads, None leaves them. The
        defaults are the CLI's, the fast ones: the model's small matrices gain little from more
        threads, and threads oversubscribed by other work make it many times slower (8 s of
        speech: 0.2-0.3 s on one thread, 2-6 s on torch's default of all cores). warm_up runs a
        throwaway stream first, so one-off allocation is not on a live stream's time."""
        if threads:
            torch.set_num_threads(threads)
        up = cls(load_model(name_or_path, resolve_device(device), steps), seed, workers)
        apply_backend(up.model, backend)
        if warm_up:
            up.warm_up()
        return up

    def warm_up(self, sr: int = 16000, channels: int = 1, hop_ms: float = 20.0) -> None:
        """A throwaway stream of WARM_UP_S of quiet noise: long enough that its band tracker makes
        its first decision, whose compiled kernels would otherwise be compiled (or loaded from
        numba's cache) in the middle of the first live stream, ~1.2 s in (RESULTS.md). It is
        taken as decoded from a lossy codec: its hops run every kernel a plain stream's do, and
        the level matching and hole filling such a stream's add."""
        noise = np.random.default_rng(0).standard_normal((round(sr * WARM_UP_S), channels))
        self.stream(sr, channels, hop_ms, fill_holes=True).feed((0.01 * noise).astype(np.float32))

    def stream(self, input_sr: int, channels: int = 1, hop_ms: float = 20.0,
               cutoff: float | Band | None = None, fill_holes: bool = False) -> Stream:
        """A live stream; cutoff None: its band is detected within ~1.4 s of active audio;
        fill_holes: it is decoded from a lossy codec (rtsr.engine.merge_low_band)."""
        return Stream(self.model, input_sr, channels, hop_ms, self.seed, cutoff, fill_holes)

    def find_band(self, x: np.ndarray, sr: int) -> Band:
        """Where the real band of a whole signal ends (the rate's Nyquist if no edge is found)."""
        sr = check_rate(sr)
        return scan_band(_as_frames(x), sr)

    def upscale(self, x: np.ndarray, sr: int, cutoff: float | Band | None = None,
                fill_holes: bool = False) -> np.ndarray:
        """(frames,) or (frames, channels) at `sr` -> the same layout at 48 kHz, exact length
        round(frames * 48000 / sr), zero lag, loudness untouched.

        The whole signal is scanned for its band first (unless cutoff is given), then streamed with
        that band fixed from the first sample: a low-passed file is extended from its start, and
        the output equals `stream(sr, cutoff=band)` fed the same signal. A full band at 48 kHz or
        more is only resampled. fill_holes: x was decoded from a lossy codec (MP3, Vorbis), whose
        holes below the band edge are filled from the model; every other cell there stays x's.
        """
        x = np.asarray(x)
        sr = check_rate(sr)
        signal = Signal(_as_frames(x), sr, as_band(cutoff, sr), fill_holes)
        y = upscale_signals(self, [signal], rows=self.workers, workers=self.workers)[0]
        return y[:, 0] if x.ndim == 1 else y

    def upscale_blocks(self, blocks: Iterable[np.ndarray], sr: int, channels: int, band: Band,
                       fill_holes: bool = False) -> Iterator[np.ndarray]:
        """(frames, channels) blocks of one signal -> its 48 kHz output in blocks, with the band fixed:
        a file of any length in bounded memory (concatenated, it is `upscale` with that band).

        Digital silence (a signal of zeros only) comes out as zeros, not as the faint hiss
        (~-113 dBFS) the model paints over it: leading zeros are held back (counted, not stored)
        until a sound comes, then fed as they were; a signal that ends silent is all zeros."""
        s = self.stream(sr, channels, OFFLINE_HOP_MS, band, fill_holes)
        held: int | None = 0  # leading zero frames not fed yet; None once a sound came
        for b in blocks:
            if held is not None and not b.any():
                held += len(b)
                continue
            if held:
                yield from (s.feed(z) for z in _zeros(held, channels, OFFLINE_BLOCK))
            held = None
            yield s.feed(b)
        if held is None:
            yield s.flush()
        else:
            yield from _zeros(round(held * SR / sr), channels, OFFLINE_BLOCK)


def _zeros(frames: int, channels: int, block: int) -> Iterator[np.ndarray]:
    """`frames` zero frames in blocks of at most `block`: a long silence in bounded memory (and
    one empty block for none, so that a signal always has a block)."""
    for i in range(0, max(frames, 1), block):
        yield np.zeros((min(block, frames - i), channels), np.float32)


def _as_frames(x: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> validated (frames, channels) float32."""
    x = np.asarray(x)
    return as_frames(x[:, None] if x.ndim == 1 else x, 1 if x.ndim == 1 else x.shape[1] if x.ndim == 2 else -1)
