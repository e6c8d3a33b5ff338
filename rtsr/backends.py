"""Execution backends for the model's networks, chosen with --backend.

    eager      plain PyTorch (any device)
    compile    torch.compile (Inductor), dynamic shapes so any batch size and hop length reuse
               one graph per network (no recompiles after warm-up)
    cudagraph  the eager networks' whole hop captured as a CUDA graph over every row of the state
               bank (a row mask says which run) and replayed (rtsr.graphs): one launch where a
               live hop made ~200
    compile-cudagraph
               `compile`'s networks inside `cudagraph`'s graphs (as vLLM captures its compiled
               model per batch size): Inductor's fused kernels launched as one graph (whether
               fewer launches beat `cudagraph`'s eager ones is for a GPU run to show)
    onnx       ONNX Runtime's CPU provider on exports with explicit state (rtsr.onnx_backend): on a
               CPU the fastest, since a live hop's cost is per-operator dispatch
    onnx-int8  `onnx` with the pointwise layers' weights and inputs in int8 at fixed, calibrated
               scales (made once per weights on first use, ~15 s): about half the time of a
               batched hop on an AVX-512 VNNI CPU, outputs within int8 rounding of the others'
               (never taken by `auto`; quality measured in RESULTS.md)
    tensorrt   torch-tensorrt (dynamo IR, fp16), an optional extra: pip install 'rtsr[tensorrt]';
               untested here (no GPU with it installed has run it)
    auto       only a candidate proven here: it runs a lone stream's and a batch's hops and matches
               eager within 1e-4 of the peak (so fp16 TensorRT is not taken), else the next, with
               a logged reason; on a CPU the first proven of onnx, eager; on CUDA every candidate is
               timed and the fastest proven one is taken

The inverse FFT and complex ops stay in PyTorch/numpy around the networks, so every backend
compiles only real-valued convolutions. A backend never moves the model to another device.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.fx.experimental import _config as fx_config

from rtsr.features import N_MELS
from rtsr.graphs import GraphedRun
from rtsr.model import SuperResModel

log = logging.getLogger("rtsr.backends")
BACKENDS = ("auto", "eager", "onnx", "onnx-int8", "compile", "cudagraph", "compile-cudagraph", "tensorrt")
COMPILED = ("compile", "compile-cudagraph")  # the networks under torch.compile
GRAPHED = ("cudagraph", "compile-cudagraph")  # the hop replayed as CUDA graphs (rtsr.graphs)


class BackendUnavailable(RuntimeError):
    """The asked-for backend cannot run here; the message says why."""


def _cuda_only(name: str, model: SuperResModel) -> None:
    if not str(model.device).startswith("cuda"):
        raise BackendUnavailable(f"backend {name!r} needs a CUDA device (model is on {model.device})")


class Compiled:
    """A network under torch.compile that any batch size and hop length reuse after warm-up.

    `dynamic=True` alone still specialises a size of 1 (one stream, a one-frame hop) and
    recompiles at the next size; compiling with sizes treated size-obliviously makes one graph
    for every size. Other attributes (`step_film`, `config`, the modules) are the network's own.
    """

    def __init__(self, net: torch.nn.Module, **options):
        self.net = net
        self.compiled = torch.compile(net, dynamic=True, **options)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        with fx_config.patch(backed_size_oblivious=True):
            return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.net, name)


def _tensorrt(model: SuperResModel) -> None:
    _cuda_only("tensorrt", model)
    try:
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" dynamo backend)
    except ImportError as e:
        raise BackendUnavailable(f"torch-tensorrt is not installed ({e}); pip install 'rtsr[tensorrt]'") from e
    opts = {"enabled_precisions": {torch.float16}}
    model.denoiser = Compiled(model.denoiser, backend="tensorrt", options=opts)
    model.vocoder = Compiled(model.vocoder, backend="tensorrt", options=opts)


def _onnx(model: SuperResModel, int8: bool = False) -> None:
    if str(model.device) != "cpu":
        raise BackendUnavailable(f"the onnx backends run on the CPU (model is on {model.device})")
    try:
        from rtsr.onnx_backend import OnnxRun
    except ImportError as e:
        raise BackendUnavailable(f"onnxruntime is not installed ({e})") from e
    model.run = OnnxRun(model, int8)


def _apply(model: SuperResModel, name: str) -> None:
    if name == "tensorrt":
        _tensorrt(model)
    elif name in ("onnx", "onnx-int8"):
        _onnx(model, int8=name == "onnx-int8")
    elif name not in ("eager", *COMPILED, *GRAPHED):
        raise BackendUnavailable(f"unknown backend {name!r}; one of {', '.join(BACKENDS)}")
    if name in GRAPHED:
        _cuda_only(name, model)
    if name in COMPILED:
        model.denoiser, model.vocoder = Compiled(model.denoiser), Compiled(model.vocoder)
    if name in GRAPHED:
        model.run = GraphedRun(model)


def auto_order(device: str) -> tuple[str, ...]:
    """The candidates in the order tried, fastest expected first. On a CPU the networks are too
    small for compilation to pay for itself, and ONNX Runtime's lower per-operator overhead is
    what counts; on CUDA every candidate is timed anyway (`measures`), and the plain graphs are
    tried before the same over compiled networks (a capture that fails is ended, but a simpler
    candidate first is the surer order)."""
    if str(device).startswith("cuda"):
        return "tensorrt", "cudagraph", "compile-cudagraph", "compile", "eager"
    return "onnx", "eager"


def measures(device: str) -> bool:
    """Whether `auto` times every candidate that proves itself and takes the fastest, rather than
    the first: on CUDA the order is not known in advance (on an H200 `compile` ran 10-25x slower
    than eager); on a CPU it is (ONNX Runtime), and timing would cost a compile per candidate."""
    return str(device).startswith("cuda")


def apply_backend(model: SuperResModel, name: str = "auto") -> str:
    """Prepare `model` to run on `name`; returns the backend in use. Explicit names fail loudly;
    `auto` takes only a candidate that runs hops here and matches eager (`Proof`)."""
    if name != "auto":
        _apply(model, name)
        return name
    proof, eager = Proof(model), (model.denoiser, model.vocoder)
    proven: dict[str, tuple[float, tuple]] = {}
    for candidate in auto_order(model.device):
        try:
            _apply(model, candidate)
            seconds = proof.check(model)
        except Exception as e:  # any failure of a candidate means: try the next one
            log.warning("backend %s unavailable, falling back: %s", candidate, e)
        else:
            if not measures(model.device):
                return candidate
            proven[candidate] = seconds, (model.denoiser, model.vocoder, model.__dict__.get("run"))
        model.denoiser, model.vocoder = eager
        model.__dict__.pop("run", None)  # the class's own run again
    if not proven:
        raise BackendUnavailable("no backend works")  # eager always works; kept for completeness
    best = min(proven, key=lambda c: proven[c][0])
    log.info("backend auto on %s: %s -> %s", model.device,
             ", ".join(f"{c} {1e3 * t:.2f} ms" for c, (t, _) in proven.items()), best)
    model.denoiser, model.vocoder, run = proven[best][1]
    if run is not None:
        model.run = run
    return best


class Proof:
    """Hops with fixed inputs and the eager model's outputs for them, which `auto` holds every
    candidate to: a lone stream and a batch (sizes a compiled graph must not specialise on), a
    few hops each with the state carried (a replayed graph that rewrites what an earlier hop
    left is caught), each output within `TOLERANCE` of eager's peak."""

    TOLERANCE = 1e-4
    BATCHES = (1, 3)
    HOPS = 3
    FRAMES = 4  # a live 20 ms hop

    def __init__(self, model: SuperResModel):
        gen = torch.Generator().manual_seed(0)
        self.inputs = [(batch, [(*(torch.randn(batch, N_MELS, self.FRAMES, generator=gen) for _ in range(3)),
                                 2000 + 10000 * torch.rand(batch, self.FRAMES, generator=gen))
                                for _ in range(self.HOPS)])
                       for batch in self.BATCHES]
        self.expected = self._run(model)

    def _run(self, model: SuperResModel) -> list[torch.Tensor]:
        outs = []
        for batch, hops in self.inputs:
            state = model.new_state(batch)
            outs += [model.run(state, cond, low, cutoff, noise) for cond, low, noise, cutoff in hops]
        return outs

    def check(self, model: SuperResModel) -> float:
        """Seconds per hop after a warm-up pass (compiles, captures); raises if any output is off."""
        self._run(model)
        start = time.perf_counter()
        got = self._run(model)
        seconds = (time.perf_counter() - start) / len(got)
        for out, ref in zip(got, self.expected, strict=True):
            err, peak = (out - ref).abs().max().item(), ref.abs().max().item()
            if not err <= self.TOLERANCE * peak:
                raise BackendUnavailable(f"differs from eager by {err:.3g} (peak {peak:.3g})")
        return seconds
