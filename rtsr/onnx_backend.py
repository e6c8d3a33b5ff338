"""`--backend onnx`: a model's whole hop run by ONNX Runtime's CPU provider, one call per hop.

On a CPU a live hop is a few frames, and its cost is PyTorch's per-operator dispatch, not the
arithmetic; ONNX Runtime runs the same graph with far less overhead. What is exported is the hop
itself (`SuperResModel.hop`: sampler or regression, mel low-band replacement, vocoder, spectra's
real and imaginary parts) with every conv cache as an explicit input and output, so the engine's
streaming state stays the engine's and the session is a pure function; one call per hop instead of
one per network, and none of the glue between them in Python. Batch and frame counts are dynamic
in the file; a live-sized shape that comes many calls in a row (a live stream's hop, a server's
steady batch) gets a session with those dimensions fixed, made once in the background, which lets
ONNX Runtime fold the shape arithmetic away (measured 14-20 % faster per hop on the shipped
`basic`); files keep the dynamic session, so their outputs are the same bits every time. Exports are cached
per weights in the user cache folder (`$XDG_CACHE_HOME/rtsr/onnx/`, keyed by a hash of the
weights, the sampler settings and the exporter's versions) and rebuilt when missing or stale. The
same .onnx file is the road to TensorRT (`trtexec`, or ONNX Runtime's TensorRT provider), which is
not wired here. `--backend onnx-int8` runs a quantized copy of the live export (`_quantize`) for
every hop, with no fixed-shape sessions: one graph and one set of scales, so a stream's bits are
the same streamed, upscaled whole or batched.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import secrets
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rtsr.features import N_FFT, N_MELS, SR, bin_freqs, log_mel, stft
from rtsr.model import ModelState, SuperResModel
from rtsr.models.nets import GATHER_MAX_FRAMES

EXPORT_VERSION = 5  # bump when the wrapper below or SuperResModel.hop changes
INT8_VERSION = 1  # bump when the quantization or its calibration changes
STATIC_AFTER = 16  # calls in a row of one (batch, frames) shape before it gets a session with them fixed
LIVE_FRAMES = 8  # only hops of at most this many frames (40 ms: live ones) ever get such a session
STATIC_SESSIONS = 2  # at most this many such sessions (each holds its own packed weights: more thrash the cache)
BUILD_WAIT_S = 10.0  # at exit, how long a fixed-shape session still being made is waited for
_BUILDS: set[threading.Thread] = set()  # fixed-shape sessions being made, in every OnnxRun


@atexit.register
def _wait_for_builds() -> None:
    deadline = time.monotonic() + BUILD_WAIT_S
    for thread in list(_BUILDS):
        thread.join(max(deadline - time.monotonic(), 0.0))


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtsr" / "onnx"


def weights_key(model: SuperResModel) -> str:
    """A hash of the model's weights, its sampler settings and the exporter's versions: a stale
    export is never used."""
    import onnxruntime

    h = hashlib.sha256(f"hop|{EXPORT_VERSION}|{torch.__version__}|{onnxruntime.__version__}|steps={model.steps}|"
                       f"guidance={model.guidance}|temperature={model.temperature}".encode())
    for net in (model.denoiser, model.vocoder):
        h.update(f"{type(net).__name__}|{net.config}".encode())
        for name, t in net.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _layout(state: ModelState) -> list[tuple[int, str]]:
    """The flat order of a state's tensors: (step index, key) for each sampler step's cache, then
    (-1, key) for the vocoder's."""
    return [(k, key) for k, cache in enumerate(state.steps) for key in cache] + [(-1, key) for key in state.vocoder]


def _get(state: ModelState, where: int) -> dict:
    return state.vocoder if where < 0 else state.steps[where]


class _HopGraph(torch.nn.Module):
    """model.hop as a pure function: (cond, low, cutoff, noise, lossy, *state) -> (re, im, *new state)."""

    def __init__(self, model: SuperResModel, layout: list[tuple[int, str]]):
        super().__init__()
        self.denoiser, self.vocoder = model.denoiser, model.vocoder  # registered: exported as weights
        self.model, self.layout = model, layout

    def forward(self, cond, low, cutoff, noise, lossy, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = ModelState(steps=[{} for _ in range(max(self.model.steps, 1))], vocoder={}, lossy=lossy)
        for (where, key), t in zip(self.layout, flat, strict=True):
            _get(state, where)[key] = t
        re, im = self.model.hop(state, cond, low, cutoff, noise)
        return (re, im, *(_get(state, where)[key] for where, key in self.layout))


class OnnxRun:
    """Called like `SuperResModel.run` (state, cond, low, cutoff, noise) -> complex spectra,
    updating the state's caches in place."""

    def __init__(self, model: SuperResModel, int8: bool = False):
        import onnxruntime as ort

        self._ort = ort
        state = model.new_state(1)
        self.layout = _layout(state)
        self.branches = next(iter(state.steps[0].values())).shape[0] if state.steps[0] else 1
        self.model, self.int8 = model, int8
        self.path = _exported(model, cache_dir() / f"hop-{weights_key(model)}.onnx", self.layout)
        if int8:
            self.path = _quantized(self.path, model.lookahead)
        self._long = None  # the long hops' session (`session_for`), made when the first comes
        self._long_lock = threading.Lock()
        self.threads = max(torch.get_num_threads(), 1)
        self.dynamic = self._session({})
        self.static: dict[tuple[int, int], object] = {}
        self.last, self.run_length = (0, 0), 0  # the latest shape and how many calls in a row had it
        self.making: dict[tuple[int, int], threading.Thread] = {}  # sessions being made
        inputs = {i.name for i in self.dynamic.get_inputs()}
        self.uses_noise = "noise" in inputs  # a regression has none
        self.uses_lossy = "lossy" in inputs  # a network trained without the codec flag has none

    def _session(self, dims: dict[str, int], path: Path | None = None):
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
        for name, value in dims.items():
            opts.add_free_dimension_override_by_name(name, value)
        # MatMul+Add -> Gemm needs 2-D operands, so it wraps every pointwise layer of the (B, T, C)
        # networks in two Reshapes; for a few frames the per-node cost of those is more than the fusion saves
        return self._ort.InferenceSession(str(path or self.path), opts, providers=["CPUExecutionProvider"],
                                          disabled_optimizers=["MatMulAddFusion"])

    def session_for(self, batch: int, frames: int):
        """The session for this shape: its own, with the dimensions fixed, once a live-sized shape
        (at most LIVE_FRAMES frames) has come STATIC_AFTER calls in a row (a live stream's hop,
        during its warm-up; a server's steady batch), for at most STATIC_SESSIONS shapes; else the
        dynamic one. Constant folding makes a fixed-shape session's results differ from the
        dynamic one's by ~1e-5, so longer hops (files, upscaled in 500 ms hops) always take the
        dynamic one: a file's output never depends on what this process ran before it (the
        dynamic session's rows are also the same whatever the batch), and the same file gives
        the same bits alone, in a batch or on another worker.
        Making one takes 0.1-0.25 s, so it is made on a thread of its own (ONNX Runtime releases
        the GIL meanwhile) and used once ready: no hop waits for it. A process that ends while one
        is being made waits for it, up to BUILD_WAIT_S, at exit (ONNX Runtime aborts the process,
        exit status 134, if the interpreter tears down under a session being built); the thread is
        a daemon, so a build that never ends cannot keep the process alive."""
        if frames > GATHER_MAX_FRAMES and not self.int8:  # int8: one graph, one set of scales for all hops
            return self.long_session()
        key = (batch, frames)
        if key in self.static:
            return self.static[key]
        self.run_length = self.run_length + 1 if key == self.last else 1
        self.last = key
        # int8 never: a fixed-shape session fuses the quantized nodes its own way, and its outputs moved
        # from the dynamic one's by a log-spectral distance of 0.05 (the float ones' ~1e-5 of the peak)
        if frames <= LIVE_FRAMES and not self.int8 and self.run_length >= STATIC_AFTER and key not in self.making \
                and len(self.static) + len(self.making) < STATIC_SESSIONS:
            dims = {"batch": batch, "frames": frames, "state_batch": batch * self.branches, "voc_batch": batch}
            self.making[key] = threading.Thread(target=self._make_static, args=(key, dims), daemon=True)
            _BUILDS.add(self.making[key])
            self.making[key].start()
        return self.dynamic

    def long_session(self):
        """Hops of more than GATHER_MAX_FRAMES frames (files, in 2 s hops) run a second export,
        traced where the depthwise convolutions are Conv nodes, as eager PyTorch runs them at that
        length, instead of gathering every frame's taps (measured on the shipped `basic`, 400
        frames: 6-7 % less time; outputs ~2e-6 of the peak apart). Exported once per weights,
        like the first."""
        with self._long_lock:  # offline worker threads may ask at once
            if self._long is None:
                path = _exported(self.model, cache_dir() / f"long-hop-{weights_key(self.model)}.onnx", self.layout,
                                 GATHER_MAX_FRAMES + 1)
                self._long = self._session({}, path)
            return self._long

    def _make_static(self, key: tuple[int, int], dims: dict[str, int]) -> None:
        """Make the fixed-shape session; if that fails, the shape keeps the dynamic one for good.
        A thread inherits its maker's scheduling: asked for by `rtsr live`'s real-time worker, this
        0.1-0.25 s of work would have run ahead of every ordinary process, so it drops to normal."""
        with contextlib.suppress(AttributeError, OSError):  # not Linux
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        try:
            self.static[key] = self._session(dims)
        except Exception as e:  # any failure only costs the speed-up
            warnings.warn(f"onnx: no fixed-shape session for {key} ({e}); using the dynamic one", stacklevel=1)
            self.static[key] = self.dynamic
        finally:
            _BUILDS.discard(self.making.pop(key))

    def __call__(self, state: ModelState, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        batch, frames = cond.shape[0], cond.shape[2]
        feeds = {"cond": _np(cond), "low": _np(low), "cutoff": _np(cutoff.expand(batch, -1))}
        if self.uses_noise:
            feeds["noise"] = _np(noise)
        if self.uses_lossy:
            feeds["lossy"] = _np(state.lossy)
        feeds.update({f"state{i}": _np(_get(state, where)[key]) for i, (where, key) in enumerate(self.layout)})
        re, im, *new = self.session_for(batch, frames).run(None, feeds)
        for (where, key), t in zip(self.layout, new, strict=True):
            _get(state, where)[key] = torch.from_numpy(t)
        return torch.complex(torch.from_numpy(re), torch.from_numpy(im))


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous():
        return t.numpy()  # the common case (states this class wrote last hop): no copy, little overhead
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _exported(model: SuperResModel, path: Path, layout: list[tuple[int, str]], frames: int = 4) -> Path:
    """The export at `path`, made if missing."""
    if not path.exists():
        _export(model, model.new_state(1), layout, path, frames)
    return path


def _quantized(path: Path, lookahead: int) -> Path:
    """The int8 copy of the export at `path`, made beside it if missing."""
    quantized = path.with_name(f"int8v{INT8_VERSION}-{path.name}")
    if not quantized.exists():
        _quantize(path, quantized, lookahead)
    return quantized


CALIBRATION_CUTOFFS = (3400.0, 4000.0, 8000.0, 11025.0, 16000.0)  # Hz: a phone's band up to an MP3's


def calibration_signals(seconds: float = 2.0) -> list[np.ndarray]:
    """48 kHz test sounds spanning what the networks meet: a speech-like voice, white noise, a
    harmonic chord and clicks, each at a loud and a quiet level."""
    from rtsr.bench import speech_like

    rng = np.random.default_rng(0)
    t = np.arange(round(SR * seconds)) / SR
    chord = sum(np.sin(2 * np.pi * f * k * t) / k for f in (220.0, 277.2, 329.6) for k in range(1, 30))
    clicks = np.zeros_like(t)
    clicks[:: SR // 7] = 1.0
    sounds = [speech_like(SR, seconds)[:, 0], 0.1 * rng.standard_normal(len(t)), 0.05 * chord,
              np.convolve(clicks, rng.standard_normal(200) * np.exp(-np.arange(200) / 40.0))[: len(t)]]
    return [(g * x / np.abs(x).max()).astype(np.float32) for x in sounds for g in (0.7, 0.01)]


def calibration_feeds(session, lookahead: int, frames: int, lossy: bool, every: int) -> list[dict[str, np.ndarray]]:
    """The float graph's inputs for every `every`th of the consecutive hops of `frames` frames over
    every calibration signal at every calibration cutoff (its spectrum cut there, as a
    band-limited input is), the states carried from hop to hop by running the float session."""
    names = [i.name for i in session.get_inputs()]
    states = [i for i in session.get_inputs() if i.name.startswith("state")]
    bins = torch.from_numpy(bin_freqs())
    feeds = []
    for x in calibration_signals():
        spec = stft(torch.nn.functional.pad(torch.from_numpy(x), (N_FFT // 2, N_FFT // 2)))
        for cut in CALIBRATION_CUTOFFS:
            mel = log_mel(spec * (bins < cut)).T[None].numpy()  # (1, mels, frames)
            state = {i.name: np.zeros([1, *i.shape[1:]], np.float32) for i in states}
            for at in range(0, mel.shape[2] - frames - lookahead + 1, frames):
                feed = {"cond": mel[:, :, at + lookahead:at + lookahead + frames], "low": mel[:, :, at:at + frames],
                        "cutoff": np.full((1, frames), cut, np.float32), "lossy": np.full(1, float(lossy), np.float32),
                        "noise": np.zeros_like(mel[:, :, :frames]), **state}
                feed = {k: np.ascontiguousarray(v) for k, v in feed.items() if k in names}
                if at // frames % every == 0:
                    feeds.append(feed)
                new = session.run([f"new_{n}" for n in state], feed)
                state = dict(zip(state, new, strict=True))
    return feeds


def _quantize(src: Path, dst: Path, lookahead: int) -> None:
    """`onnx-int8`: every MatMul (the pointwise layers: nearly all of the arithmetic) with int8
    weights, one scale per output channel, and int8 inputs at fixed scales calibrated on
    `calibration_feeds` (ONNX Runtime's static quantization; each range the 99.99th percentile of
    what the calibration hops produced: the plain minimum and maximum, stretched by a few outliers,
    took the dev set's in-band LSD 0.4635 -> 0.52 x sinc). Fixed scales keep every row its own:
    a stream's output never depends on what else is in its batch, as dynamic (per-call) scales
    would make it. Depthwise convolutions, norms and the outputs stay float32."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    feeds = [f for lossy in (False, True) for f in calibration_feeds(session, lookahead, 4, lossy, every=8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    # the calibrator keeps this many hops' intermediate tensors at once; it fails on a count that
    # divides the number of hops (onnxruntime 1.32: it clears them all and has no range left)
    batch = 64 if len(feeds) % 64 else 63
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    try:
        with warnings.catch_warnings(), _quiet_quantizer(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            quantize_static(src, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            op_types_to_quantize=["MatMul"], calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"CalibMaxIntermediateOutputs": batch, "CalibPercentile": 99.99})
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer's advice, logged on the root logger as a warning on every call, is not the
    user's business. Only records logged from onnxruntime's own files are dropped: a server's other
    threads go on logging while a quantization runs."""
    import logging

    def theirs(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(theirs)
    try:
        yield
    finally:
        root.removeFilter(theirs)


def _export(model: SuperResModel, state: ModelState, layout: list[tuple[int, str]], path: Path,
            frames: int = 4) -> None:
    """Export with batch and frames dynamic, traced at `frames` frames (which decides the path of
    the depthwise convolutions, nets.CausalDWConv), then rename into place (two processes may race)."""
    x = torch.zeros(1, N_MELS, frames)
    example = (x, x, torch.full((1, frames), 4000.0), x, torch.zeros(1))
    names = [f"state{i}" for i in range(len(layout))]
    frames3, frames2 = {0: "batch", 2: "frames"}, {0: "batch", 1: "frames"}
    dynamic = {"cond": frames3, "low": frames3, "noise": frames3, "cutoff": frames2, "lossy": {0: "batch"},
               "re": frames2, "im": frames2}
    for name, (where, _) in zip(names, layout, strict=True):
        axis = {0: "voc_batch" if where < 0 else "state_batch"}
        dynamic[name] = dynamic[f"new_{name}"] = axis
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flat = [_get(state, where)[key] for where, key in layout]
    try:
        with torch.enable_grad(), warnings.catch_warnings():  # traced: no FiLM memo keyed on values
            warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent branches (both paths agree)
            torch.onnx.export(_HopGraph(model, layout).eval(), (*example, *flat), str(tmp),
                              input_names=["cond", "low", "cutoff", "noise", "lossy", *names],
                              output_names=["re", "im", *(f"new_{n}" for n in names)],
                              dynamic_axes=dynamic, opset_version=20, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
