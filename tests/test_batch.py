"""Batching hops of many streams into one model call gives each stream its unbatched output."""

import numpy as np
import pytest

from rtsr import SuperResModel, Upscaler
from rtsr.batch import step
from rtsr.engine import Stream


def test_batched_streams_equal_separate_runs():
    model = SuperResModel.random()
    rng = np.random.default_rng(3)
    specs = [(16000, 1), (8000, 2), (44100, 1), (16000, 1)]
    inputs = [(0.05 * rng.standard_normal((int(sr * 0.4), ch))).astype(np.float32) for sr, ch in specs]
    streams = [Stream(model, sr, ch, 20.0, seed=k) for k, (sr, ch) in enumerate(specs)]
    outs = [[] for _ in streams]
    for pos in range(0, 8000, 700):  # uneven blocks, the same wall-clock share for every stream
        for s, x in zip(streams, inputs, strict=True):
            s.push(x[pos * s.input_sr // 16000:(pos + 700) * s.input_sr // 16000])
        for o, y in zip(outs, step(streams), strict=True):
            o.append(y)
    for s in streams:
        s.push_end()
    for o, y in zip(outs, step(streams), strict=True):
        o.append(y)
    for k, ((sr, _), x) in enumerate(zip(specs, inputs, strict=True)):
        alone = Upscaler(model, seed=k).upscale(x, sr)
        got = np.concatenate(outs[k])
        assert got.shape == alone.shape
        assert np.abs(got - alone).max() <= 1e-5 * np.abs(alone).max()


def test_guided_teacher_refuses_batching():
    model = SuperResModel.random()
    model.guidance = 2.0
    s = Stream(model, 16000, 1)
    s.push(np.zeros(16000, np.float32))
    with pytest.raises(ValueError, match="distilled"):
        step([s, s])
