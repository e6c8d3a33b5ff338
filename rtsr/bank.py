"""Every stream's model state in one place: preallocated, slot-indexed, updated in place.

A model call for many streams needs their conv caches side by side along the batch axis. Kept
per stream, they were concatenated before every batched hop and split back after it: one op per
cache per stream, 14-18 caches, every round. Here every cache of every sampler step and of the
vocoder, and the codec flag, is one (rows, ...) tensor on the model's device, one row per channel;
a stream owns a `Slot` (contiguous rows) from `join` to `leave`, a hop gathers the rows it runs
(a view where they are contiguous, one `index_select` per cache otherwise) and writes the new state
back in place, one op per cache for all the streams. Rows are written back only when the call
succeeds, so a failed call moves no stream (rtsr.batch relies on it). A guided teacher's step
caches hold both branches, (2, rows, ...), gathered branch-major as the sampler stacks them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from rtsr.models.nets import Cache

INITIAL_ROWS = 8  # rows of a new bank; it doubles whenever a join finds no room


@dataclass
class ModelState:
    """Streaming state of one model call's rows (one per channel): one conv cache per sampler
    step, and whether each channel was decoded from a lossy codec (1.0) or not (0.0), which a
    denoiser trained with the codec flag is told (see `models/nets.py`)."""

    steps: list[Cache]
    lossy: torch.Tensor  # (rows,)
    vocoder: Cache = field(default_factory=dict)


@dataclass(frozen=True)
class Slot:
    """A stream's rows in the bank: `start` .. `start + rows` (one per channel)."""

    start: int
    rows: int


class StateBank:
    def __init__(self, new_state: Callable[[int], ModelState], rows: int = INITIAL_ROWS):
        """new_state(rows): the zero state of that many rows (SuperResModel.new_state)."""
        self._new_state = new_state
        first = new_state(1)
        self.branches = next(iter(first.steps[0].values())).shape[0] if first.steps[0] else 1
        self._step_axis = 1 if self.branches > 1 else 0  # rows first (3x faster to gather), but for two branches
        # join/leave and the gathers/write-backs of a live thread and a server; reentrant: a stream
        # collected while the bank is busy (its finalizer runs on this thread) leaves without a deadlock
        self._lock = threading.RLock()
        self._used = np.zeros(0, bool)
        self._steps: list[dict[str, torch.Tensor]] = []
        self._vocoder: dict[str, torch.Tensor] = {}
        self._lossy = torch.zeros(0)
        self.generation = 0  # a new one whenever the bank's tensors are replaced (see `whole`)
        with self._held():
            self._grow(rows)

    @property
    def capacity(self) -> int:
        return len(self._used)

    def join(self, channels: int, lossy: bool = False) -> Slot:
        """Zeroed rows for a new stream of `channels` channels (lossy: decoded from a lossy codec)."""
        with self._held():
            if self._free_run(channels) is None:
                self._grow(max(2 * self.capacity, self.capacity + channels))
            start = self._free_run(channels)
            slot = Slot(start, channels)
            self._used[start:start + channels] = True
            self._zero(slot)
            self._lossy[start:start + channels] = float(lossy)
            return slot

    def leave(self, slot: Slot) -> None:
        """The stream is gone: its rows may be given to another."""
        with self._held():
            self._used[slot.start:slot.start + slot.rows] = False

    def reset(self, slot: Slot) -> None:
        """Zero a stream's caches (its codec flag stays): the stream starts again from silence."""
        with self._held():
            self._zero(slot)

    def view(self, slots: list[Slot]) -> ModelState:
        """The slots' state as it is now, for reading (a copy where the rows are not contiguous)."""
        with self._held():
            return self._gather(_rows(slots, self._lossy.device))

    @contextmanager
    def whole(self) -> Iterator[tuple[ModelState, int]]:
        """Every row's state as views of the bank's own tensors (a guided teacher's step caches
        branch-major, (2 x rows, ...)) and their generation, the lock held throughout: for a call
        that updates the rows it runs in place and leaves the others as they are (rtsr.graphs);
        joins and leaves wait for it. A new generation means the tensors were replaced: a call
        that kept their addresses (a CUDA graph) must take them again."""
        with self._held():  # `view`, not `flatten`: never a copy, whose writes the bank would not see
            yield ModelState(steps=[{k: t.view(-1, *t.shape[2:]) if self._step_axis else t for k, t in cache.items()}
                                    for cache in self._steps],
                             vocoder=dict(self._vocoder), lossy=self._lossy), self.generation

    @contextmanager
    def state_of(self, slots: list[Slot] | slice, adopt: bool = True) -> Iterator[ModelState]:
        """The slots' state, gathered for one model call (which may replace its tensors); written
        back into the bank when the block ends without an error, left as it was if it raises.
        adopt=False: always written into the bank's own tensors (a CUDA graph holds them)."""
        rows = _rows(slots, self._lossy.device)
        with self._held():
            state = self._gather(rows)
        gathered = _caches(state)
        yield state
        with self._held():
            self._scatter(rows, state, gathered, adopt)

    # --- storage --------------------------------------------------------------------------------

    @contextmanager
    def _held(self) -> Iterator[None]:
        """The lock, in inference mode: the model's new caches, made in that mode, are taken into
        the bank as they are (`_scatter`), and only that mode may change them in place."""
        with self._lock, torch.inference_mode():
            yield

    def _stored(self) -> Iterator[tuple[dict[str, torch.Tensor], str, int]]:
        """(cache dict, key, row axis) of every stored cache."""
        for cache in self._steps:
            for key in cache:
                yield cache, key, self._step_axis
        for key in self._vocoder:
            yield self._vocoder, key, 0

    def _grow(self, rows: int) -> None:
        fresh = self._new_state(rows)
        steps = [{k: t.view(self.branches, rows, *t.shape[1:]) if self._step_axis else t for k, t in cache.items()}
                 for cache in fresh.steps]
        n, head = self.capacity, (slice(None),) * self._step_axis + (slice(0, self.capacity),)
        for old, new in zip(self._steps, steps, strict=False):
            for k, t in old.items():
                new[k][head] = t
        for k, t in self._vocoder.items():
            fresh.vocoder[k][:n] = t
        fresh.lossy[:n] = self._lossy
        self._steps, self._vocoder, self._lossy = steps, fresh.vocoder, fresh.lossy
        self._used = np.concatenate([self._used, np.zeros(rows - n, bool)])
        self.generation += 1

    def _free_run(self, n: int) -> int | None:
        """The first start of n free rows in a row, or None."""
        free = np.concatenate([[False], ~self._used, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(free))
        starts, ends = edges[::2], edges[1::2]
        fits = np.flatnonzero(ends - starts >= n)
        return int(starts[fits[0]]) if len(fits) else None

    def _zero(self, slot: Slot) -> None:
        rows = slice(slot.start, slot.start + slot.rows)
        for cache, key, axis in self._stored():
            cache[key][(slice(None),) * axis + (rows,)] = 0.0

    def _gather(self, rows: slice | torch.Tensor) -> ModelState:
        every = isinstance(rows, slice) and rows.start == 0 and rows.stop == self.capacity  # a lone stream's rounds

        def take(t: torch.Tensor, axis: int) -> torch.Tensor:
            if every:
                part = t
            elif isinstance(rows, slice):
                part = t[(slice(None),) * axis + (rows,)]
            else:
                part = t.index_select(axis, rows)
            return part.flatten(0, 1) if axis else part  # branch-major, as the sampler stacks them

        return ModelState(steps=[{k: take(t, self._step_axis) for k, t in cache.items()} for cache in self._steps],
                          vocoder={k: take(t, 0) for k, t in self._vocoder.items()},
                          lossy=take(self._lossy, 0))

    def _scatter(self, rows: slice | torch.Tensor, state: ModelState,
                 gathered: dict[tuple[int, str], torch.Tensor], adopt: bool) -> None:
        """Write back every cache the call replaced (one it left as gathered is already there).
        A call over every row in use, from the first (a server's steady round), gives its new
        caches to the bank as they are, with no copy, if `adopt`: the bank ends where they end (the
        next join grows it again, one copy of every row, what one write-back of them all would cost)."""
        whole = adopt and isinstance(rows, slice) and rows.start == 0 and not self._used[rows.stop:].any()
        for (where, key), new in _caches(state).items():
            if new is gathered[where, key]:
                continue
            t, axis = (self._vocoder[key], 0) if where < 0 else (self._steps[where][key], self._step_axis)
            new = new.view(self.branches, -1, *new.shape[1:]) if axis else new
            if whole:
                (self._vocoder if where < 0 else self._steps[where])[key] = new
            elif isinstance(rows, slice):
                t[(slice(None),) * axis + (rows,)] = new
            else:
                t.index_copy_(axis, rows, new)
        if whole:
            self.generation += 1
            if rows.stop < self.capacity:  # the caches left as they were are cut to the same rows
                for cache, key, axis in self._stored():
                    cache[key] = cache[key][(slice(None),) * axis + (rows,)]
                self._used, self._lossy = self._used[:rows.stop], self._lossy[:rows.stop]


def cache_entries(state: ModelState) -> list[tuple[int, Cache, str]]:
    """Every cache of a state as (sampler step, the dict holding it, its key): the steps' in order,
    then the vocoder's as step -1."""
    return [(k, cache, key) for k, cache in (*enumerate(state.steps), (-1, state.vocoder)) for key in cache]


def cache_tensors(state: ModelState) -> list[torch.Tensor]:
    """Every cache tensor of a state, in `cache_entries`' order."""
    return [cache[key] for _, cache, key in cache_entries(state)]


def _caches(state: ModelState) -> dict[tuple[int, str], torch.Tensor]:
    """Every cache of a state by (sampler step, key)."""
    return {(k, key): cache[key] for k, cache, key in cache_entries(state)}


def row_index(slots: list[Slot] | slice) -> np.ndarray:
    """The slots' rows in order, as indices."""
    if isinstance(slots, slice):
        return np.arange(slots.start, slots.stop)
    return np.concatenate([np.arange(s.start, s.start + s.rows) for s in slots])


def _rows(slots: list[Slot] | slice, device: torch.device) -> slice | torch.Tensor:
    """The slots' rows in order: a slice when they follow each other (or a slice of rows given), else
    an index."""
    if isinstance(slots, slice):
        return slots
    if all(b.start == a.start + a.rows for a, b in zip(slots, slots[1:], strict=False)):
        return slice(slots[0].start, slots[-1].start + slots[-1].rows)
    return torch.from_numpy(row_index(slots)).to(device)
