"""CUDA graph semantics on a CPU, for testing rtsr.graphs' capture path without a GPU.

`torch.cuda.graph` is replaced by a recorder of every aten op run inside it (a TorchDispatchMode);
`CUDAGraph.replay` runs the recorded ops again on the very tensors they ran on, each result copied
into the tensor the capture produced: as a real replay does, it reads whatever its inputs hold now
and writes the same addresses, and nothing computed outside the capture, or allocated anew, is seen.
An op that makes the host wait for the device (`.item()`, `nonzero`, a boolean mask's indexing:
what a real capture refuses) fails the capture, so a sync that would break it on a GPU breaks it here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ops whose result's size or value the host must read from the device
HOST_SYNCS = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
              torch.ops.aten.unique_consecutive.default, torch.ops.aten._unique2.default}


def _syncs(func, args: tuple) -> bool:
    if func in HOST_SYNCS:
        return True
    if func is torch.ops.aten.index.Tensor:  # indexing by a boolean mask is a nonzero
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return False


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _syncs(func, args):
            raise RuntimeError(f"{func} waits for the device: not allowed while capturing a CUDA graph")
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out


class FakeGraph:
    def __init__(self):
        self.ops: list[tuple] = []
        self.replays = 0

    def replay(self) -> None:
        with torch.inference_mode():
            for func, args, kwargs, out in self.ops:
                got = func(*args, **kwargs)
                for old, new in zip(tree_leaves(out), tree_leaves(got), strict=True):
                    if isinstance(old, torch.Tensor) and not _same_memory(old, new):
                        old.copy_(new)
        self.replays += 1


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape


@contextlib.contextmanager
def _capture(graph: FakeGraph, **options):
    with _Recorder() as recorder:
        yield
    graph.ops = recorder.ops


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass


@pytest.fixture
def fake_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> list[FakeGraph]:
    """torch.cuda's graph capture and streams as CPU stand-ins; returns the graphs made."""
    made: list[FakeGraph] = []

    def new_graph() -> FakeGraph:
        made.append(FakeGraph())
        return made[-1]

    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", _capture)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return made
