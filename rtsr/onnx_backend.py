"""`--backend onnx`: the denoiser and vocoder run by ONNX Runtime's CPU provider.

On a CPU a live hop is a few frames, and its cost is PyTorch's per-operator dispatch, not the
arithmetic; ONNX Runtime runs the same graph with far less overhead (measured: the 1-step denoiser
for one 4-frame hop ~2x faster than eager, `rtsr bench latency --backend onnx`). Each network is
exported once with `torch.onnx.export` with every conv cache as an explicit input and output
(batch and frame counts dynamic), so the engine's streaming state stays the engine's: the session
is a pure function. Exports are cached per weights in the user cache folder
(`$XDG_CACHE_HOME/rtsr/onnx/`, keyed by a hash of the weights and the exporter's versions) and
rebuilt when missing or stale. The same .onnx files are the road to TensorRT (`trtexec`, or ONNX
Runtime's TensorRT provider), which is not wired here.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch

from rtsr.models.nets import Cache, init_cache

EXPORT_VERSION = 1  # bump when the wrapper below changes


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtsr" / "onnx"


def weights_key(net: torch.nn.Module) -> str:
    """A hash of a network's weights, its class and the exporter's versions: a stale export is never used."""
    import onnxruntime

    h = hashlib.sha256(f"{type(net).__name__}|{EXPORT_VERSION}|{torch.__version__}|{onnxruntime.__version__}".encode())
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class _ExplicitState(torch.nn.Module):
    """net(*inputs, cache) as a pure function: (*inputs, *cache tensors) -> (output, *new cache tensors)."""

    def __init__(self, net: torch.nn.Module, keys: list[str], n_inputs: int):
        super().__init__()
        self.net, self.keys, self.n_inputs = net, keys, n_inputs

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = dict(zip(self.keys, args[self.n_inputs:], strict=True))
        out = self.net(*args[:self.n_inputs], cache)
        return (out, *(cache[k] for k in self.keys))


class OnnxNet:
    """Called like the network it replaces, (*inputs, cache) -> output, updating `cache` in place;
    anything else (its config, its modules for the state layout) is the original network's."""

    def __init__(self, net: torch.nn.Module, inputs: list[str], example: list[torch.Tensor],
                 folder: Path | None = None):
        import onnxruntime as ort

        zero = init_cache(net, 1)
        self.keys, self.shapes = list(zero), {k: tuple(v.shape[1:]) for k, v in zero.items()}
        self.inputs, self.net = inputs, net
        path = (folder or cache_dir()) / f"{type(net).__name__.lower()}-{weights_key(net)}.onnx"
        if not path.exists():
            _export(net, self.keys, inputs, example, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(torch.get_num_threads(), 1)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, *args: torch.Tensor | Cache | None) -> torch.Tensor:
        *tensors, cache = args
        if cache is None:  # no streaming state: zeros, the network's causal padding
            cache = {k: torch.zeros(tensors[0].shape[0], *self.shapes[k]) for k in self.keys}
        feeds = {name: _np(t) for name, t in zip(self.inputs, tensors, strict=True)}
        feeds.update({f"state{i}": _np(cache[k]) for i, k in enumerate(self.keys)})
        out, *state = self.session.run(None, feeds)
        for k, s in zip(self.keys, state, strict=True):
            cache[k] = torch.from_numpy(s)
        return torch.from_numpy(out)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["net"], name)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _export(net: torch.nn.Module, keys: list[str], inputs: list[str], example: list[torch.Tensor], path: Path) -> None:
    """Export with batch and frames dynamic, then rename into place (two processes may race)."""
    cache = init_cache(net, example[0].shape[0])
    state = [f"state{i}" for i in range(len(keys))]
    frames = {0: "batch", 2: "frames"}
    dynamic = {name: (frames if t.dim() == 3 else {0: "batch"}) for name, t in zip(inputs, example, strict=True)}
    dynamic |= {s: {0: "batch"} for s in state} | {"out": {0: "batch", 1 if inputs == ["mel"] else 2: "frames"}}
    dynamic |= {f"new_{s}": {0: "batch"} for s in state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with torch.enable_grad(), warnings.catch_warnings():  # traced: no FiLM memo keyed on values
            warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent branches (both paths agree)
            torch.onnx.export(_ExplicitState(net, keys, len(inputs)).eval(), (*example, *cache.values()), str(tmp),
                              input_names=[*inputs, *state], output_names=["out", *(f"new_{s}" for s in state)],
                              dynamic_axes=dynamic, opset_version=17, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
