"""Execution backends for the model's networks, chosen with --backend.

    eager      plain PyTorch (any device)
    compile    torch.compile (Inductor), dynamic shapes so any hop length reuses the kernels
    cudagraph  torch.compile's reduce-overhead mode: the per-hop step replayed as CUDA graphs
    onnx       ONNX Runtime's CPU provider on exports with explicit state (rtsr.onnx_backend): on a
               CPU the fastest, since a live hop's cost is per-operator dispatch
    tensorrt   torch-tensorrt (dynamo IR, fp16), an optional extra: pip install 'rtsr[tensorrt]';
               untested here (no GPU with it installed has run it)
    auto       the fastest that is installed and works here, falling back with a logged reason

The inverse FFT and complex ops stay in PyTorch/numpy around the networks, so every backend
compiles only real-valued convolutions. A backend never moves the model to another device.
"""

from __future__ import annotations

import logging

import torch

from rtsr.features import N_MELS
from rtsr.model import SuperResModel

log = logging.getLogger("rtsr.backends")
BACKENDS = ("auto", "eager", "onnx", "compile", "cudagraph", "tensorrt")


class BackendUnavailable(RuntimeError):
    """The asked-for backend cannot run here; the message says why."""


def _cuda_only(name: str, model: SuperResModel) -> None:
    if not str(model.device).startswith("cuda"):
        raise BackendUnavailable(f"backend {name!r} needs a CUDA device (model is on {model.device})")


def _compile(model: SuperResModel, mode: str | None) -> None:
    model.denoiser = torch.compile(model.denoiser, dynamic=True, mode=mode)
    model.vocoder = torch.compile(model.vocoder, dynamic=True, mode=mode)


def _tensorrt(model: SuperResModel) -> None:
    _cuda_only("tensorrt", model)
    try:
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" dynamo backend)
    except ImportError as e:
        raise BackendUnavailable(f"torch-tensorrt is not installed ({e}); pip install 'rtsr[tensorrt]'") from e
    opts = {"enabled_precisions": {torch.float16}}
    model.denoiser = torch.compile(model.denoiser, backend="tensorrt", dynamic=True, options=opts)
    model.vocoder = torch.compile(model.vocoder, backend="tensorrt", dynamic=True, options=opts)


def _onnx(model: SuperResModel) -> None:
    if str(model.device) != "cpu":
        raise BackendUnavailable(f"backend 'onnx' runs on the CPU (model is on {model.device})")
    try:
        from rtsr.onnx_backend import OnnxRun
    except ImportError as e:
        raise BackendUnavailable(f"onnxruntime is not installed ({e})") from e
    model.run = OnnxRun(model)


def _apply(model: SuperResModel, name: str) -> None:
    if name == "eager":
        return
    if name == "compile":
        _compile(model, None)
    elif name == "cudagraph":
        _cuda_only(name, model)
        _compile(model, "reduce-overhead")
    elif name == "tensorrt":
        _tensorrt(model)
    elif name == "onnx":
        _onnx(model)
    else:
        raise BackendUnavailable(f"unknown backend {name!r}; one of {', '.join(BACKENDS)}")


def auto_order(device: str) -> tuple[str, ...]:
    """Fastest first. On a CPU the networks are too small for compilation to pay for itself, and
    ONNX Runtime's lower per-operator overhead is what counts."""
    return ("tensorrt", "cudagraph", "compile", "eager") if str(device).startswith("cuda") else ("onnx", "eager")


def apply_backend(model: SuperResModel, name: str = "auto") -> str:
    """Prepare `model` to run on `name`; returns the backend in use. Explicit names fail loudly."""
    if name != "auto":
        _apply(model, name)
        return name
    for candidate in auto_order(model.device):
        den, voc = model.denoiser, model.vocoder
        try:
            _apply(model, candidate)
            _smoke_test(model)
            return candidate
        except Exception as e:  # any failure of a candidate means: try the next one
            model.denoiser, model.vocoder = den, voc
            model.__dict__.pop("run", None)  # the class's own run again
            log.warning("backend %s unavailable, falling back: %s", candidate, e)
    raise BackendUnavailable("no backend works")  # eager always works; kept for completeness


def _smoke_test(model: SuperResModel) -> None:
    """One tiny hop through the prepared networks, so 'auto' only picks what really runs."""
    state = model.new_state(1)
    x = torch.zeros(1, N_MELS, 4)
    model.run(state, x, x, torch.full((4,), 4000.0), x)
