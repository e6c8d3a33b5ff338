"""The `cudagraph` backend: a hop's model call captured once per shape as a CUDA graph, then replayed.

Why: a live hop is ~200 small kernels, and launched one by one from Python they cost more than
they compute (an H200 ran one stream at RTF 0.3, slower than two CPU cores). A graph launches
them all at once. It replays fixed shapes at fixed addresses, so each (rows, frames) shape has
its own graph over static buffers: rows are rounded up to a power of two (a bucket: a server's
batch changes as streams come and go, and every row is computed on its own, so the spare rows
compute on whatever they hold and are never read). A call packs its inputs into one host buffer
(pinned on CUDA) for one upload, copies its streams' caches into the graph's, replays, and hands
back the spectra (one download, the call's one host sync) and the new caches as tensors of its
own (the next replay rewrites the graph's). Hops over GRAPH_MAX_FRAMES frames (offline's long
hops) are few kernels per frame of work and run eagerly.

The same code runs on a CPU with `capture=False` (each call runs the captured step itself rather
than replaying it), which is how it is tested without a GPU.
"""

from __future__ import annotations

import threading

import torch

from rtsr.bank import ModelState
from rtsr.features import N_BINS, N_MELS
from rtsr.models.nets import Cache

GRAPH_MAX_FRAMES = 32  # a live hop's frames; longer (offline) hops run eagerly
WARMUP_CALLS = 2  # eager calls on a side stream before a capture (cuBLAS's workspaces, the taps' memory)


def bucket(rows: int) -> int:
    """The graph's rows for a call of `rows`: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


class GraphedRun:
    """Called like `SuperResModel.run` (state, cond, low, cutoff, noise) -> complex spectra on the
    CPU, the state's caches replaced by the new ones; one `_Graph` per (bucket, frames)."""

    def __init__(self, model, capture: bool | None = None):
        """capture: record CUDA graphs (default: where the model is on CUDA)."""
        self.model = model
        self.capture = str(model.device).startswith("cuda") if capture is None else capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.branches = 2 if model.steps and model.guidance != 1.0 else 1
        self._lock = threading.Lock()  # one set of static buffers per shape: one call at a time

    @torch.inference_mode()
    def __call__(self, state: ModelState, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        rows, frames = cond.shape[0], cond.shape[2]
        if frames > GRAPH_MAX_FRAMES:
            return type(self.model).run(self.model, state, cond, low, cutoff, noise)
        with self._lock:
            shape = bucket(rows), frames
            graph = self.graphs.get(shape)
            if graph is None:
                graph = self.graphs[shape] = _Graph(self.model, *shape, self.branches, self.capture)
            return graph.run(state, cond, low, cutoff.expand(rows, -1), noise)


class _Graph:
    """One shape's static buffers, its step, and (capturing) its CUDA graph."""

    def __init__(self, model, rows: int, frames: int, branches: int, capture: bool):
        self.model, self.rows, self.branches = model, rows, branches
        dev = model.device
        pinned = capture and torch.cuda.is_available()
        # cond, low and noise mels, then the cutoff: one (rows, 3 mels + 1, frames) upload
        self.host = torch.zeros(rows, 3 * N_MELS + 1, frames, pin_memory=pinned)
        self.inputs = torch.zeros_like(self.host, device=dev)
        self.state = model.new_state(rows)
        self.spectra = torch.zeros(rows, frames, N_BINS, 2, device=dev)  # real, imaginary
        self.graph = None
        if capture:
            self._capture()

    def _step(self) -> None:
        """The hop on the static buffers, its new caches written over the old ones (what is captured)."""
        m, x = N_MELS, self.inputs
        state = ModelState(steps=[dict(c) for c in self.state.steps], vocoder=dict(self.state.vocoder),
                           lossy=self.state.lossy)
        re, im = self.model.hop(state, x[:, :m], x[:, m:2 * m], x[:, 3 * m], x[:, 2 * m:3 * m])
        self.spectra[..., 0].copy_(re)
        self.spectra[..., 1].copy_(im)
        for old, new in zip(_caches(self.state), _caches(state), strict=True):
            if new is not old:
                old.copy_(new)

    def _capture(self) -> None:
        now = torch.cuda.current_stream(self.model.device)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(now)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self._step()
        now.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def run(self, state: ModelState, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
            noise: torch.Tensor) -> torch.Tensor:
        rows, m = cond.shape[0], N_MELS
        for part, t in ((slice(0, m), cond), (slice(m, 2 * m), low), (slice(2 * m, 3 * m), noise)):
            self.host[:rows, part].copy_(t)
        self.host[:rows, 3 * m].copy_(cutoff)
        self.inputs[:rows].copy_(self.host[:rows], non_blocking=True)
        given = _caches(state)
        torch._foreach_copy_([self._rows(t, rows) for t in _caches(self.state)],
                             [self._split(t, rows) for t in given])
        self.state.lossy[:rows].copy_(state.lossy)
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()
        spectra = torch.view_as_complex(self.spectra[:rows].cpu())
        for (cache, key), t in zip(_entries(state), _caches(self.state), strict=True):
            cache[key] = self._rows(t, rows).clone(memory_format=torch.contiguous_format).flatten(0, 1)
        return spectra

    def _rows(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """A static cache's first `rows` rows of each branch, (branches, rows, ...)."""
        return t.view(self.branches if t.shape[0] != self.rows else 1, self.rows, *t.shape[1:])[:, :rows]

    def _split(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """A given cache as (branches, rows, ...)."""
        return t.view(-1, rows, *t.shape[1:])


def _entries(state: ModelState) -> list[tuple[Cache, str]]:
    """Every cache of a state as (its dict, its key): the sampler steps', then the vocoder's."""
    return [(c, key) for c in (*state.steps, state.vocoder) for key in c]


def _caches(state: ModelState) -> list[torch.Tensor]:
    return [c[key] for c, key in _entries(state)]
