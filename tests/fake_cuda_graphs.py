"""CUDA graph semantics on a CPU, for testing rtsr.graphs' capture path without a GPU.

`torch.cuda.graph` is replaced by a recorder of every aten op run inside it (a TorchDispatchMode);
`CUDAGraph.replay` runs the recorded ops again on the very tensors they ran on, each result copied
into the tensor the capture produced: as a real replay does, it reads whatever its inputs hold now
and writes the same addresses, and nothing computed outside the capture, or allocated anew, is seen.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
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
