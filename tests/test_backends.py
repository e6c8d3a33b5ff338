"""Backend selection: explicit names fail loudly, auto falls back with a logged reason."""

import logging
import os

import numpy as np
import pytest

from rtsr import SuperResModel, Upscaler, backends
from rtsr.backends import BackendUnavailable, apply_backend


def test_auto_on_cpu_is_eager():
    assert apply_backend(SuperResModel.random(), "auto") == "eager"


@pytest.mark.parametrize("name", ["cudagraph", "tensorrt"])
def test_gpu_backends_refuse_a_cpu_model(name):
    with pytest.raises(BackendUnavailable, match="CUDA"):
        apply_backend(SuperResModel.random(), name)


def test_unknown_backend():
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        apply_backend(SuperResModel.random(), "magic")


def test_auto_falls_back_with_a_reason(monkeypatch, caplog):
    monkeypatch.setattr(backends, "auto_order", lambda device: ("tensorrt", "eager"))
    model = SuperResModel.random()
    den = model.denoiser
    with caplog.at_level(logging.WARNING, logger="rtsr.backends"):
        assert apply_backend(model, "auto") == "eager"
    assert "tensorrt unavailable" in caplog.text and "CUDA" in caplog.text
    assert model.denoiser is den  # the failed candidate left nothing behind


@pytest.mark.skipif(not os.environ.get("RTSR_SLOW"), reason="Inductor compiles for minutes on 2 cores; RTSR_SLOW=1")
def test_compile_matches_eager():
    x = (0.05 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
    ref = Upscaler(SuperResModel.random()).upscale(x, 16000)
    model = SuperResModel.random()
    apply_backend(model, "compile")
    y = Upscaler(model).upscale(x, 16000)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
