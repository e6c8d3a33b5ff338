"""Shared fixtures: a tiny random model exported like a real one, so tests never need trained weights."""

from pathlib import Path

import pytest
import torch
from fake_cuda_graphs import fake_cuda_graphs  # noqa: F401  (a fixture: CUDA graph capture on the CPU)

from rtsr.model import SuperResModel
from rtsr.training.export import export
from rtsr.upscaler import Upscaler


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A loadable model folder (config.json + checked safetensors) holding an untrained tiny network."""
    m = SuperResModel.random()
    return export(m.denoiser, m.vocoder, tmp_path_factory.mktemp("models") / "tiny", "tiny", 2, 1.0, {})


@pytest.fixture(scope="module")
def up(tiny_model_dir: Path) -> Upscaler:
    """The tiny model as servers load it: one torch thread (the servers in a test share the process)."""
    torch.set_num_threads(1)
    return Upscaler.load(str(tiny_model_dir), backend="eager")
