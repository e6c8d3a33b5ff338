"""Shipped weights load, match their hash and give finite output; damaged weights are refused;
the training pieces learn on a synthetic batch and distillation runs a step."""

import json
import shutil

import numpy as np
import pytest
import torch

from rtsr import ModelError, SuperResModel, Upscaler
from rtsr.model import KNOWN_MODELS, bundled_path, load_model
from rtsr.models.diffusion import distill_target, noisy, v_target
from rtsr.models.nets import Denoiser, Vocoder, to_complex


@pytest.mark.parametrize("name", KNOWN_MODELS)
def test_shipped_model_loads_and_upscales(name):
    up = Upscaler.load(name)
    assert up.model.steps >= 0 and up.model.guidance == 1.0  # distilled or regression: no guidance to apply
    x = (0.1 * np.sin(np.arange(8000) * 0.3)).astype(np.float32)
    y = up.upscale(x, 8000)
    assert y.shape == (48000,) and np.isfinite(y).all()


def test_corrupted_weights_are_refused(tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(bundled_path("basic"), dest)
    w = dest / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model(str(dest))


def test_truncated_weights_with_matching_hash_are_refused(tmp_path):
    import hashlib

    dest = tmp_path / "m"
    shutil.copytree(bundled_path("basic"), dest)
    w = dest / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    cfg = json.loads((dest / "config.json").read_text())
    cfg["sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="cannot read"):
        load_model(str(dest))


def test_missing_model_says_so(tmp_path):
    with pytest.raises(ModelError, match="no trained model installed"):
        load_model(str(tmp_path))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 80, 32, generator=g).cumsum(-1) * 0.1  # smooth "mels"
    cond = x0 * torch.linspace(1, 0, 80)[None, :, None]  # the top bands gone
    mask = (torch.arange(80) < 40).float().expand(4, -1)
    return x0, cond, mask


def test_denoiser_loss_decreases():
    torch.manual_seed(0)
    net = Denoiser(32, 2, emb_dim=32)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x0, cond, mask = _batch()
    losses = []
    for _ in range(60):
        t = torch.rand(4)
        eps = torch.randn_like(x0)
        loss = ((net(noisy(x0, eps, t), cond, mask, t) - v_target(x0, eps, t)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_vocoder_loss_decreases():
    torch.manual_seed(0)
    voc = Vocoder(32, 2)
    opt = torch.optim.Adam(voc.parameters(), 3e-3)
    x0, _, _ = _batch()
    target = torch.randn(4, 32, 241).abs().log()
    losses = []
    for _ in range(40):
        out = voc(x0)
        loss = (out[:, :, 0] - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]
    assert torch.isfinite(to_complex(voc(x0)).abs()).all()


def test_distillation_step_runs_and_targets_are_consistent():
    """The distillation target, used in one DDIM step from z_t, lands on the teacher's z."""
    from rtsr.models.diffusion import ddim_update

    teacher, student = SuperResModel.random().denoiser, SuperResModel.random(seed=1).denoiser.requires_grad_(True)
    x0, cond, mask = _batch()
    t, t_end = torch.full((4,), 0.75), torch.full((4,), 0.25)
    z = noisy(x0, torch.randn_like(x0), t)
    with torch.no_grad():
        z_end = ddim_update(z, teacher(z, cond, mask, t), t, t_end)
    target = distill_target(z, z_end, t, t_end)
    assert torch.allclose(ddim_update(z, target, t, t_end), z_end, atol=1e-4)
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    loss = ((student(z, cond, mask, t) - target) ** 2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_temperature_zero_makes_the_output_independent_of_the_seed():
    x = (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
    model = SuperResModel.random(steps=1)
    by_seed = {}
    for temperature in (1.0, 0.0):
        model.temperature = temperature
        by_seed[temperature] = [Upscaler(model, seed).upscale(x, 8000) for seed in (0, 1)]
    assert not np.allclose(*by_seed[1.0])
    np.testing.assert_array_equal(*by_seed[0.0])


@pytest.mark.parametrize("change", [{"format": 2}, {"features": {"sr": 44100, "n_fft": 480, "hop": 240, "n_mels": 80}},
                                    {"features": {"sr": 48000, "n_fft": 480, "hop": 240, "n_mels": 128}}])
def test_a_model_made_for_other_features_is_refused(tmp_path, change):
    dest = tmp_path / "m"
    shutil.copytree(bundled_path("basic"), dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelError, match="this engine runs format 1"):
        load_model(str(dest))


def test_the_runtime_never_imports_training_code():
    """Every runtime entry point loads without rtsr.training (corpus builder, trainer, export)."""
    import subprocess
    import sys

    code = ("import sys, rtsr.cli, rtsr.serve, rtsr.broker, rtsr.live, rtsr.client, rtsr.upscaler, "
            "rtsr.bench_quality, rtsr.bench_band, rtsr.compare\n"
            "from rtsr.model import load_model\nload_model('basic')\n"
            "bad = sorted(m for m in sys.modules if m.startswith('rtsr.training'))\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_model_runs_only_at_the_step_counts_it_was_made_for(tmp_path):
    """A 1-step student run as a 99-step sampler drifted 4 dB louder and clipped: refused; the
    regression network has no steps to set."""
    assert load_model("speech", steps=1).steps == 1
    for steps in (2, 4, 99):
        with pytest.raises(ModelError, match="distilled for 1 sampler step"):
            load_model("speech", steps=steps)
    assert load_model("basic").steps == 0
    with pytest.raises(ModelError, match="no sampler steps"):
        load_model("basic", steps=1)


def test_protocol_client_and_broker_need_no_torch():
    """What runs on a client machine or in front of the workers does not load the engine."""
    import subprocess
    import sys

    code = ("import sys, rtsr.protocol, rtsr.client, rtsr.broker, rtsr.curve\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('rtsr'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_below_the_cutoff_the_vocoder_gets_the_inputs_mel_floored_at_the_models():
    from rtsr.features import mel_centers

    model = load_model("basic")
    seen, states = [], [model.new_state(1) for _ in range(2)]
    vocoder = model.vocoder
    model.vocoder = lambda mel, cache: (seen.append(mel.clone()), vocoder(mel, cache))[1]
    t, cutoff = 6, 12000.0
    cond = torch.randn(1, 80, t, generator=torch.Generator().manual_seed(0))
    below = torch.from_numpy(mel_centers() < 0.88 * cutoff)
    hole = below & torch.from_numpy(mel_centers() > 6000)  # a codec's hole: those bands far under anything
    low = cond.clone()
    low[:, hole] = -20.0
    for state, lifted in zip(states, (low, cond + 5.0), strict=True):  # with the hole; an input loud everywhere
        model.run(state, cond, lifted, torch.full((t,), cutoff), torch.zeros(1, 80, t))
    holed, loud = seen
    estimate = holed[:, ~below]  # the model's own mel above the kept band: the same in both runs
    torch.testing.assert_close(loud[:, ~below], estimate)
    assert (holed[:, hole] > -20.0).all() and (holed[:, hole] >= low[:, hole]).all()  # the hole is lifted
    whole = below & ~hole
    assert (holed[:, whole] >= low[:, whole]).all()
    torch.testing.assert_close(loud[:, below], cond[:, below] + 5.0)  # where the input is louder it is kept as is


def _hops(model: SuperResModel) -> torch.Tensor:
    """Three hops (4, 3 and 40 frames: gathered taps and conv1d) of three rows, fixed seed."""
    g, state, outs = torch.Generator().manual_seed(5), model.new_state(3), []
    for frames in (4, 3, 40):
        cond, low, noise = (torch.randn(3, 80, frames, generator=g) for _ in range(3))
        outs.append(model.run(state, cond, low, 2000 + 10000 * torch.rand(3, frames, generator=g), noise))
    return torch.cat(outs, 1)


# Computed by the code before issue 28 (FiLM from times as tensors, memoised by `tolist()`; DDIM
# coefficients as tensors): |out| summed, then out at the entries of `_ENTRIES`.
_ENTRIES = [(2, 21, 28), (0, 39, 72), (1, 44, 239), (0, 35, 231), (0, 22, 239), (2, 15, 20), (2, 17, 5), (2, 16, 210)]
_BEFORE = {
    (2, 1.0): (49979.591, [2.4248862266540527 - 0.14690428972244263j, 0.7023994326591492 + 0.33436208963394165j,
                           0.26524126529693604 + 0.5460422039031982j, 0.6249625086784363 - 0.6801102757453918j,
                           1.1126422882080078 + 0.7309137582778931j, 0.825770914554596 + 0.04347189888358116j,
                           0.7122465968132019 + 0.6667172312736511j, 2.967024803161621 + 2.443939447402954j]),
    (2, 2.0): (49608.358, [2.387373685836792 - 0.6300899982452393j, 0.6349747776985168 + 0.1855655461549759j,
                           0.4984739124774933 + 0.6572304964065552j, 0.9412761330604553 - 0.8327621817588806j,
                           0.9303627014160156 + 0.4151111841201782j, 0.8879579305648804 + 0.1417975127696991j,
                           0.7084343433380127 + 0.7077407240867615j, 1.7055611610412598 + 2.200244665145874j]),
    (0, 1.0): (52712.975, [0.7996379137039185 - 0.06291503459215164j, 1.651782512664795 + 0.50507652759552j,
                           0.4931991696357727 - 0.6701333522796631j, 0.49997657537460327 - 0.19773533940315247j,
                           1.3537677526474 - 0.14918768405914307j, 1.3134492635726929 + 0.10148954391479492j,
                           0.3425302803516388 + 0.9104638695716858j, 3.436009168624878 + 0.7556488513946533j]),
    (4, 1.0): (50072.122, [2.4667787551879883 - 0.18282704055309296j, 0.6754729151725769 + 0.360767126083374j,
                           0.291751891374588 + 0.5542442202568054j, 0.6896982789039612 - 0.737315833568573j,
                           1.0910664796829224 + 0.7092880606651306j, 0.7183820009231567 + 0.204245463013649j,
                           0.7827970385551453 + 0.32519522309303284j, 2.685457468032837 + 2.95241379737854j]),
}


@pytest.mark.parametrize(("steps", "guidance"), list(_BEFORE))
def test_a_hop_computes_what_it_did_before_it_stopped_syncing(steps, guidance, monkeypatch):
    """The float sampler (remembered FiLM, float DDIM coefficients) equals the tensor-time one,
    run here too, within 1e-6 of the peak (the FiLM's matrix product is one row now, not one per
    batch row: the last bit may differ), and the numbers the code before it computed."""
    import rtsr.models.diffusion as diffusion

    out = _hops(_model(steps, guidance))
    total, entries = _BEFORE[steps, guidance]
    peak = out.abs().max().item()
    assert abs(torch.view_as_real(out).double().abs().sum().item() - total) <= 1e-6 * total
    np.testing.assert_allclose(np.array([complex(out[i]) for i in _ENTRIES]), entries, rtol=0, atol=1e-6 * peak)
    if steps:  # the sampler with its times as tensors: the path before, still the training one
        monkeypatch.setattr(diffusion, "step_times", lambda n: [torch.tensor(1.0 - k / n) for k in range(n + 1)])
        torch.testing.assert_close(_hops(_model(steps, guidance)), out, rtol=0, atol=1e-6 * peak)


def _model(steps: int, guidance: float) -> SuperResModel:
    model = SuperResModel.random(seed=11, steps=steps)
    model.guidance = guidance
    return model


@pytest.mark.parametrize(("steps", "guidance", "flags"), [(2, 1.0, 0), (2, 2.0, 0), (0, 1.0, 1)])
def test_a_hop_never_reads_the_device_back_nor_uploads_a_constant(steps, guidance, flags, monkeypatch):
    """`hop` makes no host sync, from the first one on (FiLM and DDIM coefficients are made at
    load): nothing read back (`tolist`, `item`, `cpu`, `numpy`, a tensor's truth or number value
    in Python) and no tensor made from host data (each a blocking copy on a GPU, and either breaks
    a CUDA graph)."""
    torch.manual_seed(0)
    model = SuperResModel(Denoiser(32, 2, emb_dim=32, flags=flags), Vocoder(32, 2), steps, guidance)
    state, x, cutoff = model.new_state(2), torch.randn(2, 80, 4), torch.full((2, 4), 6000.0)

    def sync(*args, **kwargs):
        raise AssertionError("a host sync inside a hop")

    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, sync)
    with torch.inference_mode():  # as `run` calls it
        re, im = model.hop(state, x, x, cutoff, x)  # the first hop
        model.hop(state, x, x, cutoff, x)
    monkeypatch.undo()
    assert re.shape == im.shape == (2, 4, 241) and torch.isfinite(re).all()
