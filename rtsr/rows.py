"""Rows of preallocated arrays, handed out a stream at a time: what the intake and hop banks share.

A stream owns `channels` consecutive rows (one per channel) from `join_for` until it is collected;
the arrays double (in rows) when no rows are free, and a stream's rows are cleared for it when it
joins. The lock is reentrant: a garbage collection inside a locked section (a numba compile, a
model call) may run a gone stream's finalizer, which gives its rows back on the same thread.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

INITIAL_STREAMS = 4


class RowBank:
    def __init__(self, channels: int):
        self.channels = channels
        self.lock = threading.RLock()
        self._free: list[int] = []  # first rows no stream owns
        self._streams = 0  # streams the arrays have rows for

    def join_for(self, owner: object) -> int:
        """The first of `channels` rows for `owner` (a stream), cleared; given back when it is gone."""
        with self.lock:
            if not self._free:
                streams = max(2 * self._streams, INITIAL_STREAMS)
                self._resize(streams * self.channels)
                self._free.extend(range((streams - 1) * self.channels, self._streams * self.channels - 1,
                                        -self.channels))
                self._streams = streams
            first = self._free.pop()
            self._clear(slice(first, first + self.channels))
        weakref.finalize(owner, self._leave, first)
        return first

    def _leave(self, first: int) -> None:
        with self.lock:
            self._free.append(first)

    def _resize(self, rows: int) -> None:
        """Grow every row array to `rows` rows, keeping what they hold."""
        raise NotImplementedError

    def _clear(self, rows: slice) -> None:
        """Set a joining stream's rows to a new stream's state."""
        raise NotImplementedError


def grown(a: np.ndarray, size: int, axis: int = 0) -> np.ndarray:
    """`a` with `size` entries along `axis`, zeros after what it held."""
    shape = list(a.shape)
    shape[axis] = size
    out = np.zeros(shape, a.dtype)
    out[(slice(None),) * axis + (slice(0, a.shape[axis]),)] = a
    return out
