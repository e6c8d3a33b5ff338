"""The `cudagraph` backend (and `compile-cudagraph`, the same over compiled networks): a hop's
model call captured once as a CUDA graph, then replayed.

Why: a live hop is ~200 small kernels, and launched one by one from Python they cost more than
they compute (an H200 ran one stream at RTF 0.3, slower than two CPU cores). A graph launches
them all at once. It replays fixed shapes at fixed addresses, so a graph is made per hop length
and batch bucket (a power of two) over a fixed state store, and each call names the store's rows
it runs (kyutai moshi's streaming state with its `exec_mask` is the model): the graph gathers
those rows' caches, runs the hop, and writes the new caches back to the rows whose mask says they
ran; the bucket's spare entries name other rows, which keep what they hold. The store is the
model's state bank itself (`run_bank`: the engine's calls; nothing gathered or written back on
the host, a round's work in proportion to its streams, not to the bank's rows) or, for a call
given its state (`__call__`, as `SuperResModel.run`), a store of the call's rows rounded up to
the bucket, its caches copied in and out. Either way a call packs its inputs, the row mask and
the rows into one host buffer (pinned on CUDA) for one upload, replays, and downloads its rows'
spectra: the call's one host sync. Hops over GRAPH_MAX_FRAMES frames (offline's long hops) are
few kernels per frame of work and run eagerly, and so does a shape until it has been asked for
GRAPH_AFTER times: a live stream's hop repeats every round, but an offline segment's last short
hop is a one-off whose capture would cost more than the hop.

The same code runs on a CPU with `capture=False` (each call runs the captured step itself rather
than replaying it), which is how it is tested without a GPU.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtsr.bank import ModelState, Slot, StateBank, cache_entries, cache_tensors, row_index
from rtsr.features import N_BINS, N_MELS

if TYPE_CHECKING:
    from rtsr.model import SuperResModel

GRAPH_MAX_FRAMES = 32  # a live hop's frames; longer (offline) hops run eagerly
WARMUP_CALLS = 2  # eager calls on a side stream before a capture (cuBLAS's workspaces, the taps' memory)
GRAPH_AFTER = 3  # calls of one shape (bucket, frames) before it is graphed; the ones before run eagerly
MASK = 3 * N_MELS + 1  # the packed input's channel that says which entries run (after cond, low, noise, cutoff)
ROW = MASK + 1  # ...and the one that names each entry's row of the store (exact as a float below 2 ** 24)


def bucket(rows: int) -> int:
    """A graph's entries for a call of `rows` rows: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


def with_spares(rows: np.ndarray, size: int, store_rows: int) -> np.ndarray:
    """The call's rows, then the store's first rows not among them: `size` distinct rows (the
    spares are written back unchanged, and distinct rows keep the write-back free of races)."""
    if len(rows) == size:
        return rows
    free = np.ones(store_rows, bool)
    free[rows] = False
    return np.concatenate([rows, np.flatnonzero(free)[:size - len(rows)]])


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor copied to the CPU through pinned memory (the download of a round's spectra,
    8.4 MB for 256 streams: a copy into pageable memory goes through a staging buffer of the
    driver's), then the call's one host sync; each call its own block of torch's caching host
    allocator, so callers on other threads never share one. A CPU tensor as it is."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return out


class GraphedRun:
    """Called like `SuperResModel.run` (state, cond, low, cutoff, noise) -> complex spectra on the
    CPU, the state's caches replaced by the new ones; `run_bank` for the rows of a state bank."""

    def __init__(self, model: SuperResModel, capture: bool | None = None, graph_after: int = GRAPH_AFTER):
        """capture: record CUDA graphs (default: where the model is on CUDA); graph_after: calls
        of a shape before it is graphed."""
        self.model = model
        self.capture = str(model.device).startswith("cuda") if capture is None else capture
        self.graph_after = graph_after
        self.asked: Counter[tuple[str, int, int]] = Counter()  # calls per (store, bucket, frames)
        self.graphs: dict[tuple[int, int], _Graph] = {}  # calls given their state: (bucket, frames)
        self.banked: dict[tuple[int, int], _Graph] = {}  # the bank's rows: (bucket, frames), of one generation
        self._generation = -1  # the bank generation `banked` was made over
        self._lock = threading.Lock()  # one store per shape: one call given its state at a time; `asked`

    def _eager(self, state: ModelState, *inputs: torch.Tensor) -> torch.Tensor:
        return type(self.model).run(self.model, state, *inputs)

    def _graphs(self, store: str, rows: int, frames: int) -> bool:
        """Whether a call of this shape runs a graph: a live-sized hop asked for GRAPH_AFTER times."""
        if frames > GRAPH_MAX_FRAMES:
            return False
        key = store, bucket(rows), frames
        self.asked[key] += 1
        return self.asked[key] >= self.graph_after

    @torch.inference_mode()
    def __call__(self, state: ModelState, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        rows, frames = cond.shape[0], cond.shape[2]
        with self._lock:
            graphed = self._graphs("given", rows, frames)
        if not graphed:
            return self._eager(state, cond, low, cutoff, noise)
        with self._lock:
            shape = bucket(rows), frames
            graph = self.graphs.get(shape)
            if graph is None:
                graph = self.graphs[shape] = _Graph(self.model, self.model.new_state(shape[0]), shape, self.capture)
            stored = [graph.by_branch(t)[:, :rows] for t in cache_tensors(graph.store)]
            torch._foreach_copy_(stored, [t.view(-1, rows, *t.shape[1:]) for t in cache_tensors(state)])
            graph.store.lossy[:rows].copy_(state.lossy)
            spectra = graph.run(np.arange(shape[0]), rows, cond, low, cutoff, noise)
            for (_, cache, key), t in zip(cache_entries(state), stored, strict=True):
                cache[key] = t.clone(memory_format=torch.contiguous_format).flatten(0, 1)
            return spectra

    @torch.inference_mode()
    def run_bank(self, bank: StateBank, slots: list[Slot] | slice, cond: torch.Tensor, low: torch.Tensor,
                 cutoff: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`SuperResModel.run_slots`: the slots' rows of the bank run and updated where they lie."""
        frames, rows = cond.shape[2], row_index(slots)
        with self._lock:
            graphed = self._graphs("bank", len(rows), frames)
        if not graphed:  # written back into the tensors the graphs hold
            with bank.state_of(slots, adopt=False) as state:
                return self._eager(state, cond, low, cutoff, noise)
        with bank.whole() as (store, generation):
            if generation != self._generation:  # the bank's tensors were replaced: every graph is stale
                self.banked.clear()
                self._generation = generation
            store_rows = store.lossy.shape[0]
            shape = min(bucket(len(rows)), store_rows), frames
            graph = self.banked.get(shape)
            if graph is None:
                graph = self.banked[shape] = _Graph(self.model, store, shape, self.capture)
            return graph.run(with_spares(rows, shape[0], store_rows), len(rows), cond, low, cutoff, noise)


class _Graph:
    """One (bucket, hop length)'s step over a store's rows: its static inputs and outputs, and
    (capturing) its CUDA graph."""

    def __init__(self, model: SuperResModel, store: ModelState, shape: tuple[int, int], capture: bool):
        self.model, self.store = model, store
        self.rows, dev = store.lossy.shape[0], model.device  # the store's
        self.size, frames = shape
        # cond, low and noise mels, the cutoff, the run mask, the row: one (size, 3 mels + 3, frames) upload
        self.host = torch.zeros(self.size, ROW + 1, frames, pin_memory=capture and torch.cuda.is_available())
        self.inputs = torch.zeros_like(self.host, device=dev)
        self.spectra = torch.zeros(self.size, frames, N_BINS, 2, device=dev)  # real, imaginary
        self.graph = None
        if capture:
            self._capture()

    def by_branch(self, t: torch.Tensor) -> torch.Tensor:
        """A stored cache (branches x the store's rows, ...) as (branches, rows, ...), a view."""
        return t.view(-1, self.rows, *t.shape[1:])

    def _step(self) -> None:
        """The hop on every entry's row, new caches written back where the mask says (what is captured)."""
        m, x = N_MELS, self.inputs
        runs, at = x[:, MASK, 0] > 0, x[:, ROW, 0].long()

        def take(t: torch.Tensor) -> torch.Tensor:  # (branches x rows, ...) -> (branches x size, ...), branch-major
            return self.by_branch(t).index_select(1, at).flatten(0, 1)

        state = ModelState(steps=[{k: take(t) for k, t in c.items()} for c in self.store.steps],
                           vocoder={k: take(t) for k, t in self.store.vocoder.items()},
                           lossy=self.store.lossy.index_select(0, at))
        taken = cache_tensors(state)
        re, im = self.model.hop(state, x[:, :m], x[:, m:2 * m], x[:, 3 * m], x[:, 2 * m:3 * m])
        self.spectra[..., 0].copy_(re)
        self.spectra[..., 1].copy_(im)
        keeps: dict[int, torch.Tensor] = {}  # the mask per branch count: one kernel each, not one per cache
        for t, old, new in zip(cache_tensors(self.store), taken, cache_tensors(state), strict=True):
            if new is not old:
                branches = old.shape[0] // self.size
                if branches not in keeps:
                    keeps[branches] = runs.repeat(branches)
                kept = torch.where(keeps[branches].view(-1, *([1] * (old.dim() - 1))), new, old)
                self.by_branch(t).index_copy_(1, at, kept.view(-1, self.size, *kept.shape[1:]))

    def _capture(self) -> None:
        self.inputs[:, ROW, 0] = torch.arange(self.size, device=self.inputs.device)  # distinct rows; mask all 0
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

    def run(self, at: np.ndarray, n: int, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
            noise: torch.Tensor) -> torch.Tensor:
        """Entries 0..n-1 (store rows at[:n]) take these inputs (cutoff (T,) or one row per input)
        and a hop; the rest of `at` (distinct spare rows) keep their state. The n rows' spectra,
        in that order, on the CPU."""
        m, h = N_MELS, self.host.numpy()  # packed by numpy: a third of torch's time for such small copies
        for part, t in ((slice(0, m), cond), (slice(m, 2 * m), low), (slice(2 * m, 3 * m), noise)):
            h[:n, part] = t.numpy(force=True)
        h[:n, 3 * m] = cutoff.numpy(force=True)
        h[:, MASK] = 0.0
        h[:n, MASK] = 1.0
        h[:, ROW] = at[:, None]
        self.inputs.copy_(self.host, non_blocking=True)
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()
        return torch.view_as_complex(to_host(self.spectra[:n]))
