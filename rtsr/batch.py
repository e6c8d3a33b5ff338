"""Many streams, one model call per hop: what lets one device serve many live streams.

Streams take their input with `push`; `step` runs every stream's ready hops together
(`rtsr.engine.run_hops`: one intake call for their input, one model call per hop length, one
merge, inverse FFT and overlap-add for all of them, their state in rows of shared banks) and
hands each stream its part. The output equals running each stream alone.

A stream whose own part of a round fails (its band tracker, its part of the merge, taking its
samples) is marked failed and the round goes on for the others; then `StepFailed` names it, and
the others' finished samples wait in them (`Stream.hold`) for their next `feed`, `step` or
`take_ready`, so none is short or shifted. If the model call itself fails, no stream's state has
moved past its last completed hop.
"""

from __future__ import annotations

import numpy as np

from rtsr.engine import Stream, run_hops


class StepFailed(RuntimeError):
    """Some streams' parts of a batched round failed (`failed`: index in the list -> error); every
    other stream's round completed, its samples held for its next `feed`, `step` or `take_ready`."""

    def __init__(self, failed: dict[int, Exception]):
        super().__init__(f"{len(failed)} stream(s) failed in a batched round: "
                         + "; ".join(f"#{i}: {e}" for i, e in failed.items()))
        self.failed = failed


def step(streams: list[Stream]) -> list[np.ndarray]:
    """Run every ready hop of every stream (batched by hop length); finished samples per stream."""
    out: list[list[np.ndarray]] = [s.take_ready() for s in streams]  # full-band streams: resampled only
    failed: dict[int, Exception] = {}
    try:
        run_hops(streams, out, failed)
    except Exception:
        _hold(streams, out, failed)
        raise
    if failed:
        _hold(streams, out, failed)
        raise StepFailed(failed)
    return [np.concatenate(o) if len(o) > 1 else o[0] if o else np.zeros((0, s.channels), np.float32)
            for o, s in zip(out, streams, strict=True)]


def _hold(streams: list[Stream], out: list[list[np.ndarray]], failed: dict[int, Exception]) -> None:
    for i, (s, o) in enumerate(zip(streams, out, strict=True)):
        if i not in failed:
            s.hold(o)
