"""Many streams, one model call per hop: what lets one device serve many live streams.

Streams take their input with `push`; `step` gathers every stream's ready hop, runs the model
once over all of them (their caches side by side in the model's bank, rtsr.bank) and
hands each stream its part. The output equals running each stream alone.

A stream whose part of a round fails (its request, its merge or its overlap-add) is marked failed and the
round goes on for the others; then `StepFailed` names it, and the others' finished samples wait in
them (`Stream.hold`) for their next `feed`, `step` or `take_ready`, so none is short or shifted. If the model
call itself fails, no stream's state has moved past its last completed hop.
"""

from __future__ import annotations

import numpy as np
import torch

from rtsr.engine import HopRequest, Stream, analyse, model_inputs, synthesise


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
        _run_ready_hops(streams, out, failed)
    except Exception:
        _hold(streams, out, failed)
        raise
    if failed:
        _hold(streams, out, failed)
        raise StepFailed(failed)
    return [np.concatenate(o) if len(o) > 1 else o[0] if o else np.zeros((0, s.channels), np.float32)
            for o, s in zip(out, streams, strict=True)]


def _run_ready_hops(streams: list[Stream], out: list[list[np.ndarray]], failed: dict[int, Exception]) -> None:
    """Hops of the streams not failed, round after round, until none is ready; a stream's own
    failure is recorded in `failed` (and the stream marked), a model call's is raised."""
    analyse(streams)
    asking = range(len(streams))
    while asking:
        ready = [(i, r) for i in asking if i not in failed
                 and (r := _guarded(streams[i], i, failed, streams[i].next_request)) is not None]
        asking = [i for i, _ in ready]  # only a stream that ran a hop can have another ready
        keys = {(id(streams[i].model), r.n): streams[i].model for i, r in ready}
        for (model_id, n), model in keys.items():  # one call per model and hop length
            group = sorted(((i, r) for i, r in ready if r.n == n and id(streams[i].model) == model_id),
                           key=lambda ir: streams[ir[0]].slot.start)  # in the bank's order: its rows are one slice
            gen = model.run_slots([streams[i].slot for i, _ in group], *model_inputs([r for _, r in group]))
            _complete(streams, group, gen, out, failed)


def _complete(streams: list[Stream], group: list[tuple[int, HopRequest]], gen: torch.Tensor,
              out: list[list[np.ndarray]], failed: dict[int, Exception]) -> None:
    """Each stream of the group takes its part of the model's output: merged and inverse
    transformed for all at once, then overlap-added stream by stream. If the joint part fails,
    each stream does all of its own, so that the culprit alone fails."""
    members, sizes = [streams[i] for i, _ in group], [streams[i].channels for i, _ in group]
    try:
        frames = synthesise(members, [r for _, r in group], gen)
        finishes = [(s.add_output, part) for s, part in zip(members, np.split(frames, np.cumsum(sizes)[:-1]),
                                                                strict=True)]
    except Exception:  # find the culprit: each alone
        finishes = [(s.complete, part) for s, part in zip(members, gen.split(sizes), strict=True)]
    for (i, r), (finish, part) in zip(group, finishes, strict=True):
        y = _guarded(streams[i], i, failed, finish, r, part)
        if i not in failed:
            out[i].append(y)


def _guarded(stream: Stream, i: int, failed: dict[int, Exception], fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # this stream's alone: it is marked failed, the round goes on
        stream.fail(e)
        failed[i] = e
        return None


def _hold(streams: list[Stream], out: list[list[np.ndarray]], failed: dict[int, Exception]) -> None:
    for i, (s, o) in enumerate(zip(streams, out, strict=True)):
        if i not in failed:
            s.hold(o)
