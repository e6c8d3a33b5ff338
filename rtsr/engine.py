"""The streaming engine: one object per stream, one method per stage of the data path.

    feed(block) = push (validation; the input waits) + per ready hop: next_request (`analyse`:
    resampler to 48 kHz, STFT frames, log-mel, cutoff) -> model.run_slots (few-step sampler ->
    mel low-band replacement -> vocoder; the stream's state in the model's bank) -> complete
    (`synthesise`: STFT low-band merge, inverse FFT -> `add_output`: overlap-add crossfade) ->
    finished samples out.

A server instead `push`es many streams and runs their stages for all of them at once (rtsr.batch):
resampling, analysis, one model call, merge and inverse FFT, each stream then overlap-adding its
own rows; each stream's output is the one it gets alone.

Every stage works on absolute frame/sample indices and keeps only the state it still needs, so
feeding a signal in any block sizes gives the same output as feeding it at once; the offline
`upscale` is literally this stream fed the whole signal and flushed. Output sample n is handed out
as soon as nothing later can change it, which is at most `latency_samples` after its own input.

    rtsr bench latency    # prints streaming-vs-offline delta, latency and real-time factor
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from rtsr.audio_spec import MAX_CHANNELS, as_frames, check_rate
from rtsr.cutoff import Band, CutoffTracker, as_band
from rtsr.features import HOP, N_FFT, N_MELS, SR, log_mel, merge_weights, window
from rtsr.intake import join as join_intake
from rtsr.kernels.noise import frame_noise
from rtsr.kernels.ola import overlap_add
from rtsr.model import ModelState, SuperResModel
from rtsr.resample import StreamingResampler

HALF = N_FFT // 2
ACC_SPARE_HOPS = 8  # the overlap-add accumulator grows by this many hops at a time


# A lossy input's cell is a codec hole where its power, and its two neighbours', is under 1/10 (-10 dB)
# of the model's there: a band an encoder zeroed. Three bins (300 Hz) keep the valleys between a
# tone's harmonics, one or two bins wide, from counting as holes.
HOLE_POWER_RATIO = 0.1
HOLE_BINS = 3


@lru_cache(maxsize=256)
def _merge_row(lo_hz: float, hi_hz: float) -> np.ndarray:
    return merge_weights(lo_hz, hi_hz)


def _band_power(spec: np.ndarray) -> np.ndarray:
    """Power summed over HOLE_BINS neighbouring bins (edges repeated)."""
    p = np.abs(spec) ** 2
    h = HOLE_BINS // 2
    pad = np.pad(p, [(0, 0)] * (p.ndim - 1) + [(h, h)], mode="edge")
    return sum(pad[..., i:i + p.shape[-1]] for i in range(HOLE_BINS))


def merge_low_band(lr: np.ndarray, gen: np.ndarray, w: np.ndarray, fill_holes: bool = False) -> np.ndarray:
    """The output spectra: the input (weight w per bin) over the model's spectra (1 - w).

    fill_holes: the input was decoded from a lossy codec (MP3, Vorbis), whose encoder zeroes whole
    bands for a granule where bits run short, also far below its band edge. Such a hole is not the
    recording's (on real LAME encodes of the dev clips, 13-16 kHz of a 16 kHz speech MP3 sits 1.8
    decades under its source), so in a hole (HOLE_POWER_RATIO) where the input has its whole
    weight, the model's cell is taken; every other cell stays as merged. The fade above the edge
    is left as it is: there the input is empty by definition, and filling it would put the
    model's band hard against the edge (measured on the 36 real-world MP3/Vorbis cases of the dev
    clips, 2026-12-03: filling it took 30 of them 0.001-0.02 lower, mp3-mid 0.652 -> 0.644 x the
    input's in-band LSD, but a reference whose own band ends 0.9 kHz above a Vorbis edge 0.998 ->
    1.059: worse than the input, which the real-world bar does not allow).
    """
    merged = w * lr + (1 - w) * gen  # STFT-domain low-band replacement
    if not fill_holes:
        return merged
    hole = (w == 1) & (_band_power(lr) < HOLE_POWER_RATIO * _band_power(gen))
    return np.where(hole, gen, merged)


@dataclass
class HopRequest:
    """What the model needs for one hop of one stream (see SuperResModel.run), as arrays: cond, low
    and noise (channels, mels, n), cutoff (n,)."""

    n: int
    cond: np.ndarray
    low: np.ndarray
    cutoff: np.ndarray
    noise: np.ndarray


def model_inputs(requests: list[HopRequest]) -> tuple[torch.Tensor, ...]:
    """The model inputs of hops of one length side by side, in order: cond, low, cutoff (a row
    per channel) and noise, one array each."""
    def rows(name: str) -> torch.Tensor:
        parts = [getattr(r, name) for r in requests]
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0]))

    channels = [len(r.cond) for r in requests]
    cutoff = np.stack([r.cutoff for r in requests])
    if max(channels) > 1:
        cutoff = np.repeat(cutoff, channels, axis=0)
    return rows("cond"), rows("low"), torch.from_numpy(cutoff), rows("noise")


def synthesise(streams: list[Stream], requests: list[HopRequest], gen: torch.Tensor) -> np.ndarray:
    """The output frames (rows, n, N_FFT) of hops of one length of several streams (the model's
    spectra `gen` merged with each input's, `merge_low_band`, then the inverse FFT), one row per
    channel in order: one call of each for all the streams. Nothing in them changes."""
    n, gen = requests[0].n, gen.numpy()
    channels = [s.channels for s in streams]
    lr = np.concatenate([s.input_spectra(n) for s in streams]) if len(streams) > 1 else streams[0].input_spectra(n)
    weights = [s.merge_weights(n) for s in streams]
    if any(len(w) > 1 for w in weights):
        weights = [np.broadcast_to(w, (n, w.shape[1])) for w in weights]
    w = np.repeat(np.stack(weights), channels, axis=0)
    fill = np.repeat([s.fill_holes for s in streams], channels)
    merged = merge_low_band(lr, gen, w, fill_holes=bool(fill.all()))  # every row lossy (a lone lossy stream): once
    if fill.any() and not fill.all():
        merged[fill] = merge_low_band(lr[fill], gen[fill], w[fill], fill_holes=True)
    return np.fft.irfft(merged, n=N_FFT, axis=-1).astype(np.float32)


def analyse(streams: Iterable[Stream]) -> None:
    """Resample, STFT, log-mel and band of every frame whose window has fully arrived, in each
    stream: one intake call per input rate and channel count (`rtsr.intake`: the resampler and the
    framing of every stream in one kernel call), then one FFT and one mel projection for all the
    streams' frames, each row computed as it would be alone."""
    groups: dict[object, list[tuple[Stream, np.ndarray, tuple[int, int]]]] = {}
    for s in streams:
        if (taken := s.take_input()) is not None:
            groups.setdefault(s.intake, []).append((s, *taken))
    taken: list[tuple[Stream, int]] = []
    frames = []
    for bank, group in groups.items():
        members = [s for s, _, _ in group]
        new_at = np.zeros(len(group) + 1, np.int64)
        np.cumsum([len(x) for _, x, _ in group], out=new_at[1:])
        ends = np.array([end for _, _, end in group], np.int64).reshape(-1, 2)
        f, counts, made, made_counts = bank.take(np.array([s.row for s in members], np.int64),
                                                  np.concatenate([x for _, x, _ in group]), new_at, ends[:, 0],
                                                  ends[:, 1])
        at = 0
        for s, m in zip(members, made_counts, strict=True):
            if s.cutoff.deciding:
                s.cutoff.feed(made[at:at + m])
            at += m
        taken += zip(members, counts.tolist(), strict=True)
        frames.append(f)
    f = frames[0] if len(frames) == 1 else np.concatenate(frames) if frames else None
    if f is None or not len(f):
        return
    spec = torch.fft.rfft(torch.from_numpy(f), dim=-1)  # (frames, bins), stream by stream, channel by channel
    mel, spec, at = log_mel(spec).numpy(), spec.numpy(), 0
    for s, n in taken:
        rows = s.channels * n
        if n:
            s.add_frames(spec[at:at + rows].reshape(s.channels, n, -1),
                         mel[at:at + rows].reshape(s.channels, n, -1).transpose(0, 2, 1), s._frames + n)
        at += rows


class Stream:
    """Upscale one live signal (any rate, any channel count) to 48 kHz, block by block."""

    def __init__(self, model: SuperResModel, input_sr: int, channels: int = 1, hop_ms: float = 20.0,
                 seed: int = 0, cutoff: float | Band | None = None, fill_holes: bool = False):
        """cutoff: where the input's band ends. None: detected from the stream (rtsr.cutoff); a
        number: given in Hz (1 kHz .. the input's Nyquist, else ValueError); a Band: fixed as is
        (what `scan_band` found in a whole file). fill_holes: the input was decoded from a lossy
        codec, whose holes below the band edge are filled (`merge_low_band`) and which a model
        trained with the codec flag is told (`ModelState.lossy`)."""
        input_sr = check_rate(input_sr)
        if not 1 <= channels <= MAX_CHANNELS:
            raise ValueError(f"channels must be 1..{MAX_CHANNELS}, got {channels}")
        hop = round(hop_ms * SR / 1000)
        if hop < HOP or hop % HOP:
            raise ValueError(f"hop_ms must be a positive multiple of {1000 * HOP / SR:g} ms")
        self.model, self.input_sr, self.channels, self.seed = model, input_sr, channels, seed
        self.fill_holes = fill_holes
        self.hop_frames = hop // HOP
        band = as_band(cutoff, input_sr)
        self.cutoff = CutoffTracker(input_sr, channels, band)
        self.slot = model.bank.join(channels, lossy=fill_holes)  # its model state, in the model's bank
        weakref.finalize(self, model.bank.leave, self.slot)
        self._n_in = 0
        self._frames = 0  # LR frames analysed
        self._pos = 0  # output frames synthesised; the LR buffers below start at this frame
        self._lr_spec = np.zeros((channels, 0, N_FFT // 2 + 1), np.complex64)
        self._lr_mel = np.zeros((channels, N_MELS, 0), np.float32)
        self._cut = np.zeros((0, 3), np.float32)  # per frame: cutoff, merge start, merge end (Hz)
        self._acc = np.zeros((channels, N_FFT), np.float32)  # overlap-add accumulator
        self._acc_base = -HALF
        self._emitted = 0
        self._finished = False
        self._last = 0  # the last frame to synthesise, known once the input has ended
        # a band known to be full (a scanned file at 48 kHz or more): nothing to add, resample only
        self.passthrough = band is not None and band.full
        if self.passthrough:
            self.resampler = StreamingResampler(input_sr, SR, channels)
        else:  # resampler and unframed samples in the rows of a bank shared with the other streams
            self.intake, self.row = join_intake(self, input_sr, channels)
        self.filter = self.intake.filter if not self.passthrough else self.resampler.filter
        self.flush_to = (-1, 0)  # at the end of input: (the resampler's last output, zeros up to)
        self._ready: list[np.ndarray] = []  # finished samples not handed out yet
        self._pending: list[np.ndarray] = []  # input not resampled yet
        self._failed: Exception | None = None
        self._mono = False  # fed 1-D blocks: hand out 1-D samples

    @property
    def latency_samples(self) -> int:
        """Worst-case delay (48 kHz samples) from an input sample's arrival to its output's.

        The first sample of a hop waits for the hop's last frame, whose analysis window reaches
        HALF samples past its centre, for `lookahead` conditioning frames beyond that, and for
        the resampler's filter; the sample itself is the one "-1" of the count.
        """
        if self.passthrough:
            return self.filter.delay_out
        return (self.hop_frames + self.model.lookahead) * HOP + HALF - 1 + self.filter.delay_out

    @property
    def model_state(self) -> ModelState:
        """The stream's streaming state in the model's bank, as it is now (for reading)."""
        return self.model.bank.view([self.slot])

    @property
    def latency_ms(self) -> float:
        return 1000.0 * self.latency_samples / SR

    def feed(self, block: np.ndarray) -> np.ndarray:
        """Push any number of input samples; returns the 48 kHz samples finished by them, in the
        block's layout ((frames,) for a 1-D block, as `Upscaler.upscale` gives)."""
        self.push(block)
        self._mono = np.ndim(block) == 1
        return self._as_fed(self._drain())

    def flush(self) -> np.ndarray:
        """End of input: returns the rest, so the total is round(n_in * 48000 / input_sr)."""
        self.push_end()
        return self._as_fed(self._drain())

    def _as_fed(self, y: np.ndarray) -> np.ndarray:
        return y[:, 0] if self._mono else y

    def push(self, block: np.ndarray) -> None:
        """Take input; it is resampled and analysed when a hop is asked for (`next_request`, `feed`,
        `rtsr.batch.step`), and `complete` does the rest."""
        self._check_open()
        x = as_frames(block, self.channels)
        self._n_in += len(x)
        if self.passthrough:
            self._ready.append(self.resampler.process(x))
            return
        self._pending.append(np.array(x))  # a copy: resampled and analysed when a hop is asked for (`analyse`)

    def push_end(self) -> None:
        """Mark the end of input: zeros after it let the last frames be analysed and finished."""
        self._check_open()
        self._finished = True
        if self.passthrough:
            self._ready.append(self.resampler.flush())
            return
        self._n_out = self.filter.total_out(self._n_in)
        self._last = -(-self._n_out // HOP)  # frames 0..last make every sample < n_out final
        self.flush_to = (self._n_out, (self._last + self.model.lookahead) * HOP + HALF)

    def next_request(self) -> HopRequest | None:
        """The model inputs of the next ready hop (nothing advances until `complete`)."""
        self._check_not_failed()
        if self.passthrough:
            return None
        if self._pending or self.flush_to[0] >= 0:
            analyse([self])
        la = self.model.lookahead
        ready = (self._last + 1 - self._pos) if self._finished else (self._frames - la - self._pos)
        n = min(self.hop_frames, ready)
        if n <= 0 or (not self._finished and n < self.hop_frames):
            return None
        if self.model.steps:
            noise = frame_noise(self.seed, self._pos, n, N_MELS, self.channels)
        else:  # a one-pass regression starts from no noise
            noise = np.zeros((self.channels, N_MELS, n), np.float32)
        return HopRequest(n, self._lr_mel[:, :, la:la + n], self._lr_mel[:, :, :n], self._cut[:n, 0], noise)

    # --- stages -----------------------------------------------------------------------------

    @property
    def band(self) -> Band:
        """The band in use for the latest analysed frame (analysis runs when a hop is asked for:
        `feed`, `flush`, `rtsr.batch.step`). Only reads, so another thread may ask (rtsr live)."""
        return self.cutoff.current

    def take_input(self) -> tuple[np.ndarray, tuple[int, int]] | None:
        """For `analyse`: the input pushed since the last call, (frames, channels), and the end of
        the stream if it came since (`flush_to`, else (-1, 0)); None if neither came."""
        end, self.flush_to = self.flush_to, (-1, 0)
        if self._failed is not None or self.passthrough or not (self._pending or end[0] >= 0):
            return None
        if not self._pending:
            return np.zeros((0, self.channels), np.float32), end
        x = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        return x, end

    def add_frames(self, spec: np.ndarray, mel: np.ndarray, t1: int) -> None:
        """Take the analysis of the frames up to t1: spectra (channels, frames, bins), log-mel
        (channels, mels, frames); their band rows follow."""
        self._lr_spec = np.concatenate([self._lr_spec, spec], axis=1)
        self._lr_mel = np.concatenate([self._lr_mel, mel], axis=2)
        self._cut = np.concatenate([self._cut, self.cutoff.rows(self._frames, t1)])
        self._frames = t1

    def _check_not_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"stream failed earlier: {self._failed}") from self._failed

    def _check_open(self) -> None:
        self._check_not_failed()
        if self._finished:
            raise RuntimeError("stream already flushed")

    def fail(self, error: Exception) -> None:
        """Mark the stream broken (a hop of it failed half-way): every later call raises."""
        self._failed = error

    def hold(self, samples: list[np.ndarray]) -> None:
        """Keep finished samples for the next `take_ready` (a batched round that failed elsewhere)."""
        self._ready[:0] = samples

    def take_ready(self) -> list[np.ndarray]:
        """Finished samples not handed out yet: a passthrough stream's resampled output (it never
        makes a model request), or what a failed batched round held back (`hold`)."""
        out, self._ready = self._ready, []
        return out

    def _drain(self) -> np.ndarray:
        """Run the model hop by hop on every ready hop; return the finished samples."""
        out = self.take_ready()
        while (req := self.next_request()) is not None:
            out.append(self.complete(req, self.model.run_slots([self.slot], *model_inputs([req]))))
        return np.concatenate(out) if out else np.zeros((0, self.channels), np.float32)

    def complete(self, req: HopRequest, gen: torch.Tensor) -> np.ndarray:
        """Merge the model's spectra for `req` with the input, overlap-add, return finished samples."""
        return self.add_output(req, synthesise([self], [req], gen))

    def input_spectra(self, n: int) -> np.ndarray:
        """The input's spectra of the next n output frames, (channels, n, bins)."""
        return self._lr_spec[:, :n]

    def merge_weights(self, n: int) -> np.ndarray:
        """The input's weight per bin in the next n frames' merge: (1, bins) for one band (nearly
        always), else (n, bins)."""
        cut = self._cut[:n]
        if (cut[1:, 1:] == cut[0, 1:]).all():
            return _merge_row(float(cut[0, 1]), float(cut[0, 2]))[None]
        return np.stack([_merge_row(float(lo), float(hi)) for _, lo, hi in cut])

    def add_output(self, req: HopRequest, frames: np.ndarray) -> np.ndarray:
        """Overlap-add the hop's output frames (channels, n, N_FFT), see `synthesise`; return the
        samples this finishes."""
        n = req.n
        need = (self._pos + n - 1) * HOP + HALF - self._acc_base  # accumulator length needed
        if need > self._acc.shape[1]:  # room for a few more hops: the emitted head is sliced off each hop
            grown = np.zeros((self.channels, need + ACC_SPARE_HOPS * n * HOP), np.float32)
            grown[:, :self._acc.shape[1]] = self._acc
            self._acc = grown
        overlap_add(frames, window(), self._acc, self._pos * HOP - HALF - self._acc_base, HOP)
        self._pos += n
        self._lr_spec, self._lr_mel, self._cut = self._lr_spec[:, n:], self._lr_mel[:, :, n:], self._cut[n:]
        done = (self._pos - 1) * HOP  # samples before this are final
        if self._finished:
            done = min(done, self._n_out)
        lo, hi = self._emitted - self._acc_base, done - self._acc_base
        y = self._acc[:, lo:hi].copy() if hi > lo else np.zeros((self.channels, 0), np.float32)
        self._emitted = max(done, self._emitted)
        self._acc = self._acc[:, max(hi, lo):]
        self._acc_base += max(hi, lo)
        return y.T

