"""`rtsr live`: an input device -> the engine -> speakers and/or a recording, in real time.

    rtsr live                                   # default microphone -> default speakers
    rtsr live --record out.wav --no-play --duration 10
    rtsr live --passthrough                     # the plain resampled input, same latency: for A/B
    rtsr live --list-devices

PortAudio calls its callbacks on a real-time thread where any wait is an audible glitch, so the
callbacks here only copy into and out of preallocated ring buffers and count status flags; a
worker thread runs the engine. Input and output are separate device streams (the input runs at
its own rate, the output at 48 kHz), joined only through the rings.

When the worker falls behind, the output callback plays silence for what is missing (an
underrun: counted, never a stop), waits to refill to its target before playing again, and later
drops what was generated beyond the target, so the latency returns to where it was.

Ctrl-C and SIGTERM only ask the run to stop (`stop_signals`): it stops at its next check,
whatever the main thread was in (torch's import, a model load, PortAudio), closes its devices and
keeps its recording. Module imports are light, so that holds from the command's first moment.

`LiveEngine` has no PortAudio in it: tests drive its callbacks with a fake device.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rtsr.audio_io import AudioError, AudioWriter, check_writable
from rtsr.audio_spec import SR
from rtsr.cli import BACKEND_NAMES, cutoff_hz, device_name, positive_int

if TYPE_CHECKING:
    from rtsr.cutoff import Band

PORTAUDIO_HINT = "PortAudio library not found: install it (Debian/Ubuntu: apt-get install libportaudio2)"


class LiveError(Exception):
    """A problem with devices or setup: printed as one line, exit status 2."""


class StoppedEarly(Exception):
    """Ctrl-C or SIGTERM before the run began: nothing to keep, exit status 130."""


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """SIGINT (Ctrl-C) and SIGTERM set the event instead of raising wherever the main thread is: an
    exception thrown into a model load or a PortAudio call could crash the process, and SIGTERM's
    default ends it with the recording left a hidden temporary. A second Ctrl-C raises as usual.

    The handlers restart interrupted system calls (SA_RESTART): Python's own calls retry anyway, but
    C libraries need not. JACK's client library does not: a Ctrl-C while PortAudio started made it
    say "no audio devices found" or raise PortAudioError ("Could not read result type")."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.siginterrupt(sig, False)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Ring:
    """A fixed-size (frames, channels) float32 FIFO for one writer thread and one reader thread.

    Only the writer moves `_w` and only the reader moves `_r`, and each copies its data before
    moving its index, so no lock is needed (nothing that could block a real-time callback).
    Plain numpy slice copies: a numba kernel would not beat two memcpy-sized slices.
    """

    def __init__(self, frames: int, channels: int):
        self.buf = np.zeros((frames, channels), np.float32)
        self.capacity = frames
        self._w = self._r = 0  # total frames written / read, ever

    @property
    def readable(self) -> int:
        return self._w - self._r

    @property
    def writable(self) -> int:
        return self.capacity - self.readable

    def write(self, x: np.ndarray) -> int:
        """Copy in as much of x as fits; returns how many frames were taken."""
        n = min(len(x), self.writable)
        i = self._w % self.capacity
        k = min(n, self.capacity - i)
        self.buf[i:i + k] = x[:k]
        self.buf[:n - k] = x[k:n]
        self._w += n
        return n

    def read(self, out: np.ndarray) -> int:
        """Fill `out` from the front as far as there is data; returns how many frames were read."""
        n = min(len(out), self.readable)
        i = self._r % self.capacity
        k = min(n, self.capacity - i)
        out[:k] = self.buf[i:i + k]
        out[k:n] = self.buf[:n - k]
        self._r += n
        return n

    def skip(self, n: int) -> int:
        """Drop up to n frames from the front (reader side)."""
        n = min(n, self.readable)
        self._r += n
        return n


class Processor(Protocol):
    """What the worker runs: the engine Stream, or Passthrough."""

    latency_samples: int

    def feed(self, block: np.ndarray) -> np.ndarray: ...

    def flush(self) -> np.ndarray: ...


class Passthrough:
    """The input resampled to 48 kHz and held back to the engine's latency: the "before" of an A/B.

    Like the engine's, its output is aligned with the input (no added lag in the samples) and
    handed out `latency_samples` after the input arrives, so both are heard equally late.
    """

    def __init__(self, input_sr: int, channels: int, latency_samples: int):
        from rtsr.resample import StreamingResampler

        self.resampler = StreamingResampler(input_sr, SR, channels)
        self.input_sr, self.latency_samples = input_sr, latency_samples
        self._held = np.zeros((0, channels), np.float32)
        self._n_in = self._n_out = 0

    def feed(self, block: np.ndarray) -> np.ndarray:
        self._n_in += len(block)
        self._held = np.concatenate([self._held, self.resampler.process(block)])
        n = min(max(self._n_in * SR // self.input_sr - self.latency_samples - self._n_out, 0), len(self._held))
        y, self._held = self._held[:n], self._held[n:]
        self._n_out += n
        return y

    def flush(self) -> np.ndarray:
        """End of input: what is held back, and the resampler's last samples."""
        y, self._held = np.concatenate([self._held, self.resampler.flush()]), self._held[:0]
        self._n_out += len(y)
        return y


@dataclass
class Counters:
    device_xruns: int = 0  # callbacks PortAudio flagged (its own over/underflows)
    underruns: int = 0  # output callbacks that had to pad with silence
    padded: int = 0  # output frames of silence so padded
    overflows: int = 0  # input callbacks that found the input ring full (the worker far behind)
    dropped_in: int = 0  # input frames so dropped
    skipped: int = 0  # output frames dropped to bring the latency back to its target
    compute_s: float = 0.0
    audio_s: float = 0.0  # input seconds processed

    @property
    def xruns(self) -> int:
        return self.device_xruns + self.underruns + self.overflows

    @property
    def rtf(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else 0.0


class LiveEngine:
    """Input ring -> worker (engine) -> output ring, with the two device callbacks.

    `target_frames` is the output buffer the output callback keeps ahead of itself: playback
    starts (and restarts after an underrun) once that much is there, and anything beyond
    target + `slack_frames` is dropped.
    """

    def __init__(self, proc: Processor, input_sr: int, channels: int, hop_in: int, target_frames: int,
                 slack_frames: int | None = None, ring_seconds: float = 2.0,
                 record: Callable[[np.ndarray], None] | None = None, play: bool = True):
        self.proc, self.input_sr, self.channels, self.hop_in = proc, input_sr, channels, hop_in
        self.play = play  # False: no output device, so nothing goes into (or waits in) the output ring
        self.target, self.slack = target_frames, target_frames if slack_frames is None else slack_frames
        self.inp = Ring(int(ring_seconds * input_sr) + hop_in, channels)
        self.out = Ring(int(ring_seconds * SR) + target_frames, channels)
        self.record, self.c = record, Counters()
        self._block = np.zeros((self.inp.capacity, channels), np.float32)  # the worker's read buffer
        self._playing = False  # the output ring is being played (not filling up to its target)
        self._started = False  # it has been played at least once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.shown: list[float] = []  # the latencies the status lines showed (ms)
        self.realtime = False  # the worker got a real-time priority (`realtime_priority`)

    # --- device callbacks: copies and counters only ------------------------------------------

    def input_callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.c.device_xruns += 1
        lost = frames - self.inp.write(indata)
        if lost:
            self.c.overflows += 1
            self.c.dropped_in += lost

    def output_callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.c.device_xruns += 1
        have = self.out.readable
        if not self._playing and have >= self.target:
            self._playing = True
            if have > self.target + self.slack:  # came back from a stall with a backlog
                self.c.skipped += self.out.skip(have - self.target)
        n = self.out.read(outdata[:frames]) if self._playing else 0
        if n < frames:
            outdata[n:frames] = 0
            if self._playing:  # ran dry: count it, and rebuffer to the target before going on
                self.c.underruns += 1
                self._playing = False
            if self._started:  # silence that is not the initial fill is padding
                self.c.padded += frames - n
        self._started |= self._playing

    # --- the worker -----------------------------------------------------------------------------

    def step(self) -> int:
        """Run the engine on every whole hop of waiting input; returns input frames processed."""
        n = self.inp.readable // self.hop_in * self.hop_in
        if not n:
            return 0
        x = self._block[:self.inp.read(self._block[:n])]
        t0 = time.perf_counter()
        y = self.proc.feed(x)
        self.c.compute_s += time.perf_counter() - t0
        self.c.audio_s += n / self.input_sr
        if self.record is not None:
            self.record(y)
        if self.play:
            self.c.skipped += len(y) - self.out.write(y)  # only if the output device stopped taking it
        return n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rtsr-live-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def finish(self) -> None:
        """After stop(): the input left in the ring (less than a hop) and what the processor holds
        back (its latency) go to the recording, so it is as long as the input processed."""
        if self.record is None or self.error is not None or (self._thread and self._thread.is_alive()):
            return
        left = self._block[:self.inp.read(self._block[:self.inp.readable])]
        self.c.audio_s += len(left) / self.input_sr
        self.record(np.concatenate([self.proc.feed(left), self.proc.flush()]))

    def _run(self) -> None:
        idle = self.hop_in / self.input_sr / 4
        try:
            torch_threads_as_set()
            self.realtime = realtime_priority()
            while not self._stop.is_set():
                if not self.step():
                    time.sleep(idle)
        except BaseException as e:  # reported by the foreground, which is not blocked on us
            self.error = e

    # --- reporting ------------------------------------------------------------------------------

    def latency_ms(self, device_s: float = 0.0) -> float:
        """Input-to-output delay now: engine + both rings (+ what the devices report)."""
        return 1000 * (self.proc.latency_samples / SR + self.inp.readable / self.input_sr
                       + (self.out.readable / SR if self.play else 0.0) + device_s)

    def status(self, device_s: float = 0.0) -> str:
        c = self.c
        self.shown.append(self.latency_ms(device_s))
        return (f"latency {self.shown[-1]:6.1f} ms | RTF {c.rtf:5.3f} | xruns {c.xruns} "
                f"(underruns {c.underruns}, overflows {c.overflows}, device {c.device_xruns})")

    def summary(self, device_s: float = 0.0) -> str:
        """The run's figures; its latency is the median of the status lines' (after a stop the
        rings hold what was left, which is no one's latency)."""
        c = self.c
        latency = float(np.median(self.shown)) if self.shown else self.latency_ms(device_s)
        return (f"{c.audio_s:.1f} s processed, RTF {c.rtf:.3f}, latency {latency:.1f} ms (median); "
                f"xruns {c.xruns}: {c.underruns} underruns ({c.padded / SR * 1000:.0f} ms of silence), "
                f"{c.overflows} overflows ({c.dropped_in} input frames dropped), {c.device_xruns} device, "
                f"{c.skipped} output frames dropped to recover latency; worker at "
                + ("real-time priority" if self.realtime else "normal priority (real-time not permitted here)"))


def torch_threads_as_set() -> None:
    """Give this thread torch's CPU thread count as the process set it (Upscaler.load: one).
    OpenMP's and MKL's counts are per thread, so a thread of its own ran the engine's FFTs and
    logs with a team of every core's threads, which spun against each other and everything else:
    live's RTF was 0.8-0.95 where `rtsr bench latency` (one thread, the main one) gave 0.2."""
    import torch

    torch.set_num_threads(torch.get_num_threads())


def realtime_priority() -> bool:
    """Put this thread (the worker) ahead of every ordinary process: SCHED_FIFO at the lowest
    real-time priority, so below the audio callbacks' threads. Where it is allowed (root,
    CAP_SYS_NICE, or an rtprio limit, as a JACK install gives its audio group); else nothing changes.
    On a busy machine other processes took the core mid-hop: a hop's wall time was 1.2-1.4x its CPU
    time, its p99 11-12.5 ms; at this priority wall ~ CPU and p99 5-8.5 ms (2 cores, load 4-6)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, OSError):  # not Linux, or not permitted
        return False
    return True


def band_line(band: Band) -> str:
    what = {"rate": "its rate's Nyquist", "detected": "detected", "given": "given"}[band.source]
    return f"band {band.hz / 1000:.2f} kHz ({what})"


# --- devices ----------------------------------------------------------------------------------------


def import_sounddevice() -> ModuleType:
    """sounddevice, imported only when a device is used; PortAudio's absence is one line, not a trace."""
    try:
        import sounddevice
    except OSError as e:
        raise LiveError(PORTAUDIO_HINT) from e
    except ImportError as e:
        raise LiveError("sounddevice is not installed: pip install 'rtsr[live]'") from e
    except Exception as e:  # PortAudioError (sounddevice's own class): PortAudio would not start
        raise LiveError(f"PortAudio would not start: {e}") from e
    return sounddevice


def choose_rate(can_open: Callable[[int], bool], default_sr: int, asked_sr: int | None,
                cutoff: float | None) -> tuple[int, float | None, str | None]:
    """(rate to open the input device at, cutoff, a note for the user).

    A device that cannot run at --input-sr (a JACK server runs at one rate only) is opened at its
    default rate instead; the rate asked for still says where the band ends (its Nyquist), unless
    --cutoff does.
    """
    if asked_sr is None or asked_sr == default_sr or can_open(asked_sr):
        return asked_sr or default_sr, cutoff, None
    band = cutoff or min(asked_sr, default_sr) / 2
    return default_sr, band, (f"the input device cannot run at {asked_sr} Hz: opened at {default_sr} Hz, "
                              f"band {band / 1000:g} kHz")


def _device(text: str | None) -> int | str | None:
    return int(text) if text is not None and text.isdigit() else text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "live", help="microphone (or any input device) -> engine -> speakers and/or a file",
        description="Upscale an input device live. The model runs on a worker thread (at real-time priority "
                    "where allowed: root, or an rtprio limit such as a JACK install's audio group gives); the "
                    "audio callbacks only copy. Ctrl-C stops and prints a summary.")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--input-device", metavar="ID_OR_NAME", help="(default: the system's)")
    p.add_argument("--output-device", metavar="ID_OR_NAME", help="(default: the system's)")
    p.add_argument("--input-sr", type=int,
                   help="input rate (default: the input device's default rate); a device that cannot run at it "
                        "is opened at its default rate, with the band ending at half this rate")
    p.add_argument("--cutoff", type=cutoff_hz, default=None, metavar="auto|HZ",
                   help="where the input's real band ends (default: auto, found within ~1.4 s of sound)")
    p.add_argument("--channels", type=positive_int, default=1, help="input channels (default: %(default)s)")
    p.add_argument("--hop-ms", type=float, default=20.0, help="engine hop, a multiple of 5 (default: %(default)s)")
    p.add_argument("--buffer-ms", type=float, default=20.0,
                   help="output kept buffered against compute jitter (default: %(default)s)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--model", default="basic", help="model name or folder (default: %(default)s)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                   help="network execution backend (default auto: the fastest that works here)")
    p.add_argument("--passthrough", action="store_true",
                   help="play the plain resampled input with the same latency (for A/B listening)")
    p.add_argument("--record", type=Path, metavar="OUT.wav", help="also write the output here (48 kHz float)")
    p.add_argument("--no-play", action="store_true", help="do not open an output device (use with --record)")
    p.add_argument("--overwrite", action="store_true", help="replace --record's file if it exists")
    p.set_defaults(func=run_live)


def run_live(args: argparse.Namespace) -> int:
    try:
        with stop_signals() as stop:
            return _run_live(args, stop)
    except StoppedEarly:
        print("rtsr live: stopped before the run began", file=sys.stderr)
        return 130
    except (LiveError, AudioError) as e:
        print(f"rtsr live: {e}", file=sys.stderr)
        return 2


def _go_on(stop: threading.Event) -> None:
    """Between set-up steps: a stop asked for meanwhile ends the run here."""
    if stop.is_set():
        raise StoppedEarly


def _run_live(args: argparse.Namespace, stop: threading.Event) -> int:
    sd = import_sounddevice()
    if not sd.query_devices():
        apis = ", ".join(api["name"] for api in sd.query_hostapis())
        raise LiveError(f"no audio devices found (PortAudio looked through {apis or 'no host API'}): "
                        "is the sound server running? (JACK: jackd; to test without sound hardware: "
                        "jackd -d dummy)")
    if args.list_devices:
        print(sd.query_devices())
        return 0
    if args.no_play and not args.record:
        raise LiveError("--no-play needs --record (otherwise nothing would come out)")
    if args.record:
        check_writable(args.record, args.overwrite)
    in_dev, out_dev = _device(args.input_device), _device(args.output_device)
    try:
        info = sd.query_devices(in_dev, "input")
    except (ValueError, sd.PortAudioError) as e:
        if in_dev is None:
            raise LiveError(f"no default input device ({e}); name one with --input-device "
                            "(rtsr live --list-devices)") from e
        raise LiveError(f"no such input device {args.input_device!r}: {e}") from e

    def can_open(sr: int) -> bool:
        try:
            sd.check_input_settings(device=in_dev, samplerate=sr, channels=args.channels)
            return True
        except (sd.PortAudioError, ValueError):
            return False

    input_sr, cutoff, note = choose_rate(can_open, int(info["default_samplerate"]), args.input_sr, args.cutoff)
    if note:
        print(f"rtsr live: {note}", file=sys.stderr)


    _go_on(stop)
    from rtsr.model import ModelError
    from rtsr.upscaler import Upscaler

    _go_on(stop)
    try:
        up = Upscaler.load(args.model, args.device, backend=args.backend, threads=1)
        stream = up.stream(input_sr, args.channels, args.hop_ms, cutoff)
    except (ModelError, ValueError, RuntimeError) as e:
        raise LiveError(str(e)) from e
    _go_on(stop)
    if not args.passthrough:  # first calls are slow (allocation, caches): not on the live stream's time
        up.warm_up(input_sr, args.channels, args.hop_ms)
    _go_on(stop)
    proc: Processor = Passthrough(input_sr, args.channels, stream.latency_samples) if args.passthrough else stream
    hop_in = max(round(input_sr * args.hop_ms / 1000), 1)
    live = LiveEngine(proc, input_sr, args.channels, hop_in, max(round(SR * args.buffer_ms / 1000), 1),
                      play=not args.no_play)
    try:
        ins = sd.InputStream(device=in_dev, samplerate=input_sr, channels=args.channels, dtype="float32",
                             blocksize=hop_in, callback=live.input_callback)
        outs = None if args.no_play else sd.OutputStream(
            device=out_dev, samplerate=SR, channels=args.channels, dtype="float32",
            blocksize=round(SR * args.hop_ms / 1000), callback=live.output_callback)
    except (sd.PortAudioError, ValueError) as e:
        raise LiveError(f"cannot open the audio devices: {e}") from e
    device_s = ins.latency + (outs.latency if outs else 0.0)
    what = "passthrough" if args.passthrough else f"model {stream.model.name}"
    band = stream.band
    print(f"{what}: {input_sr} Hz x {args.channels} -> 48000 Hz, engine latency {stream.latency_ms:.1f} ms, "
          f"{band_line(band)}; Ctrl-C stops", file=sys.stderr)
    recording = Recording(args.record, args.channels, args.overwrite) if args.record else None
    live.record = recording.write if recording else None
    live.start()
    t0 = time.monotonic()
    try:
        with ins, (outs or contextlib.nullcontext()):
            while (args.duration is None or time.monotonic() - t0 < args.duration) and not stop.wait(0.25):
                if live.error:
                    raise LiveError(f"engine failed: {live.error}")
                if stream.band != band:
                    band = stream.band
                    print(f"\n{band_line(band)}", file=sys.stderr)
                print("\r" + live.status(device_s), end="", file=sys.stderr, flush=True)
    finally:
        live.stop()
        live.finish()
        print("\n" + live.summary(device_s), file=sys.stderr)
        if recording is not None:  # what was recorded is kept, whatever stopped the run
            recording.close()
    return 0


class Recording:
    """--record: written as it comes (the engine thread appends each output block), renamed into
    place when the run ends, however it ends: nothing held in memory, nothing lost on an error."""

    def __init__(self, path: Path, channels: int, overwrite: bool):
        fmt = "flac" if path.suffix.lower() == ".flac" else "wav"
        self.path, self.frames = path, 0
        self.writer = AudioWriter(path, SR, channels, fmt, overwrite)

    def write(self, y: np.ndarray) -> None:
        self.writer.write(y)
        self.frames += len(y)

    def close(self) -> None:
        with self.writer:
            self.writer.commit()
        print(f"recorded {self.frames / SR:.1f} s to {self.path}", file=sys.stderr)

