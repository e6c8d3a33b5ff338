"""Many streams, one model call per hop: what lets one device serve many live streams.

Streams take their input with `push`; `step` gathers every stream's ready hop, runs the model
once over all of them (caches stacked along the batch axis, see SuperResModel.run_batch) and
hands each stream its part. The output equals running each stream alone.
"""

from __future__ import annotations

import numpy as np
import torch

from rtsr.engine import Stream


def batchable(stream: Stream) -> bool:
    """run_batch needs guidance baked in (a distilled model, or the regression)."""
    return not (stream.model.steps and stream.model.guidance != 1.0)


def step(streams: list[Stream]) -> list[np.ndarray]:
    """Run every ready hop of every stream (batched by hop length); finished samples per stream."""
    out: list[list[np.ndarray]] = [s.take_through() for s in streams]  # full-band streams: resampled only
    while True:
        ready = [(i, r) for i, s in enumerate(streams) if (r := s.next_request()) is not None]
        if not ready:
            break
        keys = {(id(streams[i].model), r.n): streams[i].model for i, r in ready}
        for (model_id, n), model in keys.items():  # one call per model and hop length
            group = [(i, r) for i, r in ready if r.n == n and id(streams[i].model) == model_id]
            gen = model.run_batch([streams[i].model_state for i, _ in group],
                                  torch.cat([r.cond for _, r in group]), torch.cat([r.low for _, r in group]),
                                  torch.cat([r.cutoff.expand(streams[i].channels, -1) for i, r in group]),
                                  torch.cat([r.noise for _, r in group]))
            for (i, r), g in zip(group, gen.split([streams[i].channels for i, _ in group]), strict=True):
                out[i].append(streams[i].complete(r, g))
    empty = [np.zeros((0, s.channels), np.float32) for s in streams]
    return [np.concatenate(o) if o else e for o, e in zip(out, empty, strict=True)]
