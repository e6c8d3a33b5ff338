"""The streaming engine: a stream's data path, run for many streams at once.

    feed(block) = push (validation; the input waits) + per ready hop: `analyse` (resampler to
    48 kHz and framing: one intake kernel call, rtsr.intake; STFT and log-mel; band) ->
    `run_hops`: model.run_slots (few-step sampler -> mel low-band replacement -> vocoder; each
    stream's caches in the model's bank, rtsr.bank) -> a lossy input's model band raised to the
    input's level at its edge (rtsr.hopbank.match_levels) -> STFT low-band merge and inverse FFT ->
    overlap-add crossfade (one kernel call, rtsr.hopbank) -> finished samples out.

A stream's state lives in rows of banks shared by all the streams (rtsr.intake: input side,
rtsr.hopbank: queued frames and overlap-add tail, rtsr.bank: the networks' caches), so a server's
round (rtsr.batch) is a few calls for all its streams, not a few calls per stream; `Stream` is the
one-stream view, and each stream's output is the one it gets alone.

Every stage works on absolute frame/sample indices and keeps only the state it still needs, so
feeding a signal in any block sizes gives the same output as feeding it at once; the offline
`upscale` is literally this stream fed the whole signal and flushed. Output sample n is handed out
as soon as nothing later can change it, which is at most `latency_samples` after its own input.

    rtsr bench latency    # prints streaming-vs-offline delta, latency and real-time factor
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from math import ceil

import numpy as np
import torch

from rtsr import hopbank
from rtsr.audio_spec import MAX_CHANNELS, as_frames, check_rate
from rtsr.cutoff import Band, CutoffTracker, as_band, due_spectra
from rtsr.features import HOP, N_FFT, N_MELS, SR
from rtsr.hopbank import NOT_ENDED
from rtsr.intake import join as join_intake
from rtsr.kernels.hops import hop_inputs, merged_spectra
from rtsr.kernels.intake import all_finite
from rtsr.kernels.mel import log_mel_frames
from rtsr.kernels.noise import frame_noise
from rtsr.model import ModelState, SuperResModel
from rtsr.resample import StreamingResampler

HALF = N_FFT // 2


# A lossy input's cell is a codec hole where its power, and its two neighbours', is under 1/10 (-10 dB)
# of the model's there: a band an encoder zeroed. Three bins (300 Hz) keep the valleys between a
# tone's harmonics, one or two bins wide, from counting as holes.
HOLE_POWER_RATIO = 0.1
HOLE_BINS = 3


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
    weight, the model's cell is taken; every other cell stays as merged. Above the edge a lossy
    input has no whole weight: its fade starts at the edge (rtsr.cutoff.Band.merge_range).
    """
    merged = w * lr + (1 - w) * gen  # STFT-domain low-band replacement
    if not fill_holes:
        return merged
    hole = (w == 1) & (_band_power(lr) < HOLE_POWER_RATIO * _band_power(gen))
    return np.where(hole, gen, merged)


def analyse(streams: Iterable[Stream]) -> list[Stream]:
    """Resample, frame, STFT, log-mel and band the input each stream has taken (`take_input`):
    one intake call per input rate and channel count (rtsr.intake: resampler and framing of every
    stream in one kernel call), one FFT and one mel projection for all the frames, one queueing
    call per hop bank. A stream whose band tracker fails is marked failed; the others go on.
    Returns the streams with input left (`take_input` takes a few hops' worth at a time)."""
    groups: dict[object, list[tuple[Stream, np.ndarray, tuple[int, int]]]] = {}
    left = []
    for s in streams:
        if (taken := s.take_input()) is not None:
            groups.setdefault(s.intake, []).append((s, *taken))
            if s._pending:
                left.append(s)
    framed: list[tuple[list[Stream], np.ndarray]] = []
    frames = []
    # deciding trackers with spectra to commit, up to a sample each; each then decides if its turn has
    # come (a tracker with none to commit has no decision due: `CutoffTracker.take`)
    due: list[tuple[Stream, int]] = []
    for bank, group in groups.items():
        members = [s for s, _, _ in group]
        new_at = np.zeros(len(group) + 1, np.int64)
        np.cumsum([len(x) for _, x, _ in group], out=new_at[1:])
        ends = np.array([end for _, _, end in group], np.int64).reshape(-1, 2)
        deciding = np.array([s.cutoff.deciding for s in members])  # their trackers take the 48 kHz samples
        f, counts, made, made_counts = bank.take(np.array([s.row for s in members], np.int64),
                                                  np.concatenate([x for _, x, _ in group]), new_at, ends[:, 0],
                                                  ends[:, 1], deciding)
        starts = np.cumsum(made_counts) - made_counts
        for k in np.flatnonzero(deciding):
            s = members[k]
            if (until := _guarded(s, s.cutoff.take, made[starts[k]:starts[k] + made_counts[k]])) is not None:
                due.append((s, until))
        framed.append((members, counts))
        frames.append(f)
    _commit_spectra(due)
    for s, _ in due:
        if s._failed is None:
            _guarded(s, s.cutoff.decide)
    f = frames[0] if len(frames) == 1 else np.concatenate(frames) if frames else None
    if f is None or not len(f):
        return left
    spec = torch.fft.rfft(torch.from_numpy(f), dim=-1).numpy()  # (frames, bins), stream by stream, channel by channel
    mel = log_mel_frames(spec)
    by_bank: dict[object, list[tuple[list[Stream], np.ndarray, np.ndarray]]] = {}
    at = 0
    for members, counts in framed:  # one intake bank's streams: the same channel count
        spans = members[0].channels * counts
        starts = at + np.cumsum(spans) - spans
        at += int(spans.sum())
        banks = [s.hops for s in members]
        if all(b is banks[0] for b in banks):  # a server's usual round: one model, one hop bank
            by_bank.setdefault(banks[0], []).append((members, counts, starts))
        else:
            for k, (s, b) in enumerate(zip(members, banks, strict=True)):
                by_bank.setdefault(b, []).append(([s], counts[k:k + 1], starts[k:k + 1]))
    for bank, parts in by_bank.items():
        members = [s for m, _, _ in parts for s in m]
        counts = np.concatenate([c for _, c, _ in parts])
        at = np.concatenate([a for _, _, a in parts])
        rows = np.array([s.hop_row for s in members], np.int64)
        # a settled band is each frame's band; a deciding tracker says (a failed one: its stream alone)
        deciding = {k: _guarded(s, s.band_rows, int(counts[k])) for k, s in enumerate(members)
                    if s.cutoff.deciding and counts[k] and s.decides_within(int(counts[k]))}
        band_now = bank.band_now[rows]
        for k, ids in deciding.items():
            if ids is not None:
                band_now[k] = ids[0]
        bank.enqueue(rows, counts, at, band_now, spec, mel)
        for k, ids in deciding.items():
            if ids is not None and (ids != ids[0]).any():  # the band moved within these frames
                s, n = members[k], int(counts[k])
                with bank.lock:  # a stream joining on another thread may grow the bank's arrays
                    q = bank.queued[s.hop_row]
                    bank.band[s.hop_row:s.hop_row + s.channels, q - n:q] = ids
    return left


def _commit_spectra(due: list[tuple[Stream, int]]) -> None:
    """The deciding trackers' detector frames, all through one FFT call (rtsr.cutoff.due_spectra),
    then counted tracker by tracker; if the call fails (nothing counted yet), each tracker commits
    its own, so that a failure stays its stream's."""
    if not due:  # a round of settled streams
        return
    try:
        spectra = due_spectra([(s.cutoff.spectrum, until) for s, until in due])
    except Exception:
        for s, until in due:
            _guarded(s, s.cutoff.spectrum.commit, until)
        return
    for (s, _), spec in zip(due, spectra, strict=True):
        if spec is not None:
            _guarded(s, s.cutoff.spectrum.count, spec)


def run_hops(streams: list[Stream], out: list[list[np.ndarray]], failed: dict[int, Exception]) -> None:
    """Every ready hop of the streams (their input analysed first), round after round until none
    is ready: one model call per model, hop length and bank, then merge, inverse FFT and
    overlap-add for all its streams. Finished samples go to out[i]. A stream's own failure is
    recorded in `failed` (index -> error; the stream marked failed) and the others go on; a model
    call's is raised, with no stream moved past its last finished hop."""
    left = {id(s) for s in analyse(streams)}
    asking = [i for i, s in enumerate(streams) if not s.passthrough]
    while asking:
        failed.update({i: streams[i]._failed for i in asking if streams[i]._failed is not None and i not in failed})
        by_bank: dict[hopbank.HopBank, list[int]] = {}
        for i in asking:
            if i not in failed:
                by_bank.setdefault(streams[i].hops, []).append(i)
        more: list[int] = []
        starved: list[int] = []
        for bank, idx in by_bank.items():
            first = np.array([streams[i].hop_row for i in idx], np.int64)
            has_left = np.array([id(streams[i]) in left for i in idx]) if left else np.zeros(len(idx), bool)
            all_in = (bank.out_end[first] != NOT_ENDED) & ~has_left  # every frame up to its end analysed
            n_of = bank.ready_frames(first, all_in)
            for n in np.unique(n_of[n_of > 0]):  # a hop bank is one model's
                pick = np.flatnonzero(n_of == n)
                pick = pick[np.argsort(bank.slot_start[first[pick]], kind="stable")]  # the model bank's row order
                _run_group(bank, int(n), [idx[k] for k in pick], first[pick], streams, out, failed)
            # asked again: a stream that ran and has another hop queued, or one with input to analyse;
            # analysed again only once its next hop waits for frames (each analysis takes a little
            # more than a hop's input: analysed at every hop, a long block's frames would pile up)
            ready = bank.ready_frames(first, all_in) > 0
            more += [idx[k] for k in np.flatnonzero(((n_of > 0) & ready) | has_left) if idx[k] not in failed]
            starved += [idx[k] for k in np.flatnonzero(has_left & ~ready) if idx[k] not in failed]
        # the streams analysed now say whether input is left; the others' input waits as it was
        left = (left - {id(streams[i]) for i in starved}) | {id(s) for s in analyse([streams[i] for i in starved])}
        asking = more


def _run_group(bank: hopbank.HopBank, n: int, idx: list[int], first: np.ndarray, streams: list[Stream],
               out: list[list[np.ndarray]], failed: dict[int, Exception]) -> None:
    """One hop of n frames for each stream idx[k] of streams (first row first[k]; one model, one
    bank, in the model bank's row order)."""
    members = [streams[i] for i in idx]
    model = members[0].model
    rows = (first[:, None] + np.arange(bank.channels)).ravel()
    cond, low, band = hop_inputs(rows, bank.mel, bank.band, model.lookahead, n)
    if model.steps:
        noise = np.concatenate([frame_noise(s.seed, int(p), n, N_MELS, s.channels)
                                for s, p in zip(members, bank.synthesised[first], strict=True)])
    else:  # a one-pass regression starts from no noise
        noise = np.zeros_like(cond)
    starts = bank.slot_start[first]  # ascending: the streams' slots follow each other if they span no more
    contiguous = starts[-1] - starts[0] == (len(starts) - 1) * bank.channels
    slots = slice(int(starts[0]), int(starts[-1]) + bank.channels) if contiguous else [s.slot for s in members]
    gen = model.run_slots(slots, torch.from_numpy(cond), torch.from_numpy(low),
                          torch.from_numpy(bank.band_hz[band]), torch.from_numpy(noise)).numpy()
    lossy = bank.lossy[rows]
    powers = bank.match_levels(rows, lossy, band, gen) if lossy.any() else None  # no call for a round of WAVs
    try:
        frames = synthesise(bank, rows, band, gen, lossy)
    except Exception:  # find the culprit: each alone
        frames = np.zeros((len(rows), n, N_FFT), np.float32)
        for k, (i, s) in enumerate(zip(idx, members, strict=True)):
            part = slice(k * bank.channels, (k + 1) * bank.channels)
            if (f := _guarded(s, synthesise, bank, rows[part], band[part], gen[part], lossy[part])) is None:
                failed[i] = s._failed
            else:
                frames[part] = f
    y, made = bank.overlap_add(first, n, frames)
    if powers is not None:
        bank.remember_levels(rows, lossy, powers)
    samples, ch = y.T, bank.channels  # (samples, rows): each stream's part a view
    for k, (i, m) in enumerate(zip(idx, made.tolist(), strict=True)):
        if i not in failed:
            out[i].append(samples[:m, k * ch:(k + 1) * ch])


def synthesise(bank: hopbank.HopBank, rows: np.ndarray, band: np.ndarray, gen: np.ndarray,
               fill: np.ndarray) -> np.ndarray:
    """The output frames (rows, n, N_FFT) of one hop of these rows: the model's spectra `gen`
    merged with each row's input (`merge_low_band`, the input's weight per bin from each frame's
    band; one kernel pass for rows without hole filling), then the inverse FFT; nothing in the
    bank changes."""
    merged = merged_spectra(rows, bank.spec, band, bank.band_weights, gen)
    if fill.any():
        n = band.shape[1]
        merged[fill] = merge_low_band(bank.spec[rows[fill], :n], gen[fill], bank.band_weights[band[fill]],
                                      fill_holes=True)
    return torch.fft.irfft(torch.from_numpy(merged), n=N_FFT, dim=-1).numpy()


def _guarded(stream: Stream, fn: Callable, *args):
    """fn(*args); if it raises, the stream is marked failed (its own failure) and None comes back."""
    try:
        return fn(*args)
    except Exception as e:
        stream.fail(e)
        return None


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
        self.cutoff = CutoffTracker(input_sr, channels, band, lossy=fill_holes)
        self._n_in = 0
        self._finished = False
        # a band known to be full (a scanned file at 48 kHz or more): nothing to add, resample only
        self.passthrough = band is not None and band.full
        if self.passthrough:
            self.resampler = StreamingResampler(input_sr, SR, channels)
            self.filter = self.resampler.filter
        else:  # every other stage's state lives in rows of banks shared with the other streams
            self.slot = model.bank.join(channels, lossy=fill_holes)  # the networks' caches
            weakref.finalize(self, model.bank.leave, self.slot)
            self.intake, self.row = join_intake(self, input_sr, channels)
            # its frame counters too (frames analysed, synthesised, samples handed out, its end)
            self.hops, self.hop_row = hopbank.join(self, model, channels, self.hop_frames, fill_holes, self.slot.start)
            self.filter = self.intake.filter
            self.hops.set_band_now(self.hop_row, self.cutoff.row())
        # input taken per analysis: a few hops' worth, so that a long block queues a bounded number of frames
        self._take_max = ceil((self.hop_frames + 2) * HOP * input_sr / SR) + 1
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
        """Take input; it is resampled and analysed when hops are run (`feed`, `flush`,
        `rtsr.batch.step`)."""
        if self._failed is not None or self._finished:
            self._check_open()
        x = as_frames(block, self.channels, all_finite)
        self._n_in += len(x)
        if self.passthrough:
            self._ready.append(self.resampler.process(x))
            return
        self._pending.append(np.array(x))  # a copy: resampled and analysed when hops are run

    def push_end(self) -> None:
        """Mark the end of input: zeros after it let the last frames be analysed and finished."""
        self._check_open()
        self._finished = True
        if self.passthrough:
            self._ready.append(self.resampler.flush())
            return
        n_out = self.filter.total_out(self._n_in)
        self.hops.end(self.hop_row, n_out)
        self.flush_to = (n_out, (hopbank.last_frame(n_out) + self.model.lookahead) * HOP + HALF)

    @property
    def band(self) -> Band:
        """The band in use for the latest analysed frame (analysis runs when hops are run: `feed`,
        `flush`, `rtsr.batch.step`). Only reads, so another thread may ask (rtsr live)."""
        return self.cutoff.current

    def take_input(self) -> tuple[np.ndarray, tuple[int, int]] | None:
        """For `analyse`: the input pushed since the last call, (frames, channels), a few hops'
        worth at most (the rest waits for the next call), and the end of the stream once every
        input is taken (`flush_to`, else (-1, 0)); None if there is neither."""
        if self._failed is not None or self.passthrough or not self.has_input():
            return None
        x = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0] if self._pending else None
        if x is None:
            x = np.zeros((0, self.channels), np.float32)
        self._pending = [x[self._take_max:]] if len(x) > self._take_max else []
        if self._pending:
            return x[:self._take_max], (-1, 0)
        end, self.flush_to = self.flush_to, (-1, 0)
        return x, end

    def has_input(self) -> bool:
        """Input (or its end) is waiting to be analysed."""
        return bool(self._pending) or self.flush_to[0] >= 0

    def decides_within(self, n: int) -> bool:
        """Whether the band tracker makes a decision within the next n frames analysed (else every
        one of them is in `band_now`'s band)."""
        t = int(self.hops.analysed[self.hop_row])
        return self.cutoff.decides_within(t, t + n)

    def band_rows(self, n: int) -> np.ndarray:
        """The band index of each of the next n frames analysed, over which the band tracker makes
        a decision (`decides_within`)."""
        t = int(self.hops.analysed[self.hop_row])
        rows = self.cutoff.rows(t, t + n)
        self.hops.set_band_now(self.hop_row, self.cutoff.row())
        if (rows == rows[0]).all():
            return np.full(n, self.hops.band_id(tuple(rows[0])), np.int32)
        return np.array([self.hops.band_id(tuple(r)) for r in rows], np.int32)

    @property
    def analysed_frames(self) -> int:
        """Input frames analysed so far (`band` is the band of the latest)."""
        return 0 if self.passthrough else int(self.hops.analysed[self.hop_row])

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
        runs a hop), or what a failed batched round held back (`hold`)."""
        out, self._ready = self._ready, []
        return out

    def _drain(self) -> np.ndarray:
        """Run every ready hop; return the finished samples."""
        self._check_not_failed()
        out, failed = [self.take_ready()], {}
        run_hops([self], out, failed)
        if failed:
            raise failed[0]
        return np.concatenate(out[0]) if out[0] else np.zeros((0, self.channels), np.float32)
