"""The `cudagraph` backend: a hop's model call captured once as a CUDA graph, then replayed.

Why: a live hop is ~200 small kernels, and launched one by one from Python they cost more than
they compute (an H200 ran one stream at RTF 0.3, slower than two CPU cores). A graph launches
them all at once. It replays fixed shapes at fixed addresses, so a graph runs every row of a
fixed state store (kyutai moshi's streaming state with its `exec_mask` is the model): the rows
of this call's streams take their new caches, the others (streams with no hop ready, free rows)
keep theirs, so a row computed in vain is never read. The store is the model's state bank itself
(`run_bank`: the engine's calls; nothing gathered, nothing written back, one graph per hop
length while the bank keeps its tensors) or, for a call given its state (`__call__`, as
`SuperResModel.run`), a store of the call's rows rounded up to a power of two, its caches copied
in and out. Either way a call packs its inputs and the row mask into one host buffer (pinned on
CUDA) for one upload, replays, and downloads its rows' spectra: the call's one host sync. Hops
over GRAPH_MAX_FRAMES frames (offline's long hops) are few kernels per frame of work and run
eagerly.

The same code runs on a CPU with `capture=False` (each call runs the captured step itself rather
than replaying it), which is how it is tested without a GPU.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtsr.bank import ModelState, Slot, StateBank, cache_entries, row_index
from rtsr.features import N_BINS, N_MELS

if TYPE_CHECKING:
    from rtsr.model import SuperResModel

GRAPH_MAX_FRAMES = 32  # a live hop's frames; longer (offline) hops run eagerly
WARMUP_CALLS = 2  # eager calls on a side stream before a capture (cuBLAS's workspaces, the taps' memory)
MASK = 3 * N_MELS + 1  # the packed input's channel that says which rows run (after cond, low, noise, cutoff)


def bucket(rows: int) -> int:
    """The store's rows for a call of `rows` given its state: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


class GraphedRun:
    """Called like `SuperResModel.run` (state, cond, low, cutoff, noise) -> complex spectra on the
    CPU, the state's caches replaced by the new ones; `run_bank` for the rows of a state bank."""

    def __init__(self, model: SuperResModel, capture: bool | None = None):
        """capture: record CUDA graphs (default: where the model is on CUDA)."""
        self.model = model
        self.capture = str(model.device).startswith("cuda") if capture is None else capture
        self.graphs: dict[tuple[int, int], _Graph] = {}  # calls given their state: (bucket, frames)
        self.banked: dict[int, _Graph] = {}  # the bank's rows: frames
        self._lock = threading.Lock()  # one store per shape: one call given its state at a time

    def _eager(self, state: ModelState, *inputs: torch.Tensor) -> torch.Tensor:
        return type(self.model).run(self.model, state, *inputs)

    @torch.inference_mode()
    def __call__(self, state: ModelState, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        rows, frames = cond.shape[0], cond.shape[2]
        if frames > GRAPH_MAX_FRAMES:
            return self._eager(state, cond, low, cutoff, noise)
        with self._lock:
            shape = bucket(rows), frames
            graph = self.graphs.get(shape)
            if graph is None:
                graph = self.graphs[shape] = _Graph(self.model, self.model.new_state(shape[0]), frames, self.capture)
            stored = [graph.rows_of(t, rows) for t in _caches(graph.store)]
            torch._foreach_copy_(stored, [t.view(-1, rows, *t.shape[1:]) for t in _caches(state)])
            graph.store.lossy[:rows].copy_(state.lossy)
            spectra = graph.run(np.arange(rows), cond, low, cutoff, noise)
            for (_, cache, key), t in zip(cache_entries(state), stored, strict=True):
                cache[key] = t.clone(memory_format=torch.contiguous_format).flatten(0, 1)
            return spectra

    @torch.inference_mode()
    def run_bank(self, bank: StateBank, slots: list[Slot] | slice, cond: torch.Tensor, low: torch.Tensor,
                 cutoff: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`SuperResModel.run_slots`: the slots' rows of the bank run and updated where they lie."""
        frames = cond.shape[2]
        if frames > GRAPH_MAX_FRAMES:  # written back into the tensors the graphs hold
            with bank.state_of(slots, adopt=False) as state:
                return self._eager(state, cond, low, cutoff, noise)
        with bank.whole() as (store, generation):
            graph = self.banked.get(frames)
            if graph is None or graph.generation != generation:
                graph = self.banked[frames] = _Graph(self.model, store, frames, self.capture, generation)
            return graph.run(row_index(slots), cond, low, cutoff, noise)


class _Graph:
    """One hop length's step over a store's rows: its static inputs and outputs, and (capturing)
    its CUDA graph."""

    def __init__(self, model: SuperResModel, store: ModelState, frames: int, capture: bool, generation: int = 0):
        self.model, self.store, self.generation = model, store, generation
        self.rows, dev = store.lossy.shape[0], model.device
        # cond, low and noise mels, the cutoff, the row mask: one (rows, 3 mels + 2, frames) upload
        self.host = torch.zeros(self.rows, MASK + 1, frames, pin_memory=capture and torch.cuda.is_available())
        self.inputs = torch.zeros_like(self.host, device=dev)
        self.spectra = torch.zeros(self.rows, frames, N_BINS, 2, device=dev)  # real, imaginary
        self.graph = None
        if capture:
            self._capture()

    def rows_of(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """A stored cache's first `rows` rows of each branch, (branches, rows, ...)."""
        return t.view(-1, self.rows, *t.shape[1:])[:, :rows]

    def _step(self) -> None:
        """The hop on every row, new caches written over the old where the mask says (what is captured)."""
        m, x = N_MELS, self.inputs
        runs = x[:, MASK, 0] > 0
        state = ModelState(steps=[dict(c) for c in self.store.steps], vocoder=dict(self.store.vocoder),
                           lossy=self.store.lossy)
        re, im = self.model.hop(state, x[:, :m], x[:, m:2 * m], x[:, 3 * m], x[:, 2 * m:3 * m])
        self.spectra[..., 0].copy_(re)
        self.spectra[..., 1].copy_(im)
        for old, new in zip(_caches(self.store), _caches(state), strict=True):
            if new is not old:
                keep = runs.repeat(old.shape[0] // self.rows).view(-1, *([1] * (old.dim() - 1)))
                old.copy_(torch.where(keep, new, old))

    def _capture(self) -> None:
        now = torch.cuda.current_stream(self.model.device)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(now)
        with torch.cuda.stream(side):  # the mask is all zeros: no row's state moves
            for _ in range(WARMUP_CALLS):
                self._step()
        now.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # other threads may use the device meanwhile (offline workers' long hops run eagerly)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._step()

    def run(self, rows: np.ndarray, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
            noise: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of the store take these inputs (cutoff (T,) or one row per input) and a hop;
        their spectra, in that order, on the CPU."""
        m, at = N_MELS, torch.from_numpy(rows)
        self.host[:, MASK] = 0.0
        for part, t in ((slice(0, m), cond), (slice(m, 2 * m), low), (slice(2 * m, 3 * m), noise)):
            self.host[at, part] = t.to(self.host)
        self.host[at, 3 * m] = cutoff.to(self.host).expand(len(rows), -1)
        self.host[at, MASK] = 1.0
        self.inputs.copy_(self.host, non_blocking=True)
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()
        whole = len(rows) == self.rows and bool((rows == np.arange(self.rows)).all())
        mine = self.spectra if whole else self.spectra.index_select(0, at.to(self.spectra.device))
        return torch.view_as_complex(mine.cpu())


def _caches(state: ModelState) -> list[torch.Tensor]:
    return [cache[key] for _, cache, key in cache_entries(state)]
