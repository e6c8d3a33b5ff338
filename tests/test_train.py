"""Band-aware training: crops know their target's band, cutoffs fall under it, losses ignore what lies above."""

import argparse
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsr.cutoff import band_of_48k
from rtsr.features import N_FFT, SR, cutoff_mask, mel_centers, stft
from rtsr.models.nets import Vocoder
from rtsr.training.codec import CODECS, encode_decode
from rtsr.training.train import (
    CUTOFF_UNDER_BAND,
    LSD_EPS,
    MARGIN,
    AudioPool,
    TargetBand,
    Trainer,
    aligned,
    band_weights,
    in_band,
    load_grown,
    regression_loss,
    vocoder_loss,
)


def _noise(seconds: float, band_hz: float, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(int(seconds * SR))
    spec = np.fft.rfft(x)
    spec[np.fft.rfftfreq(len(x), 1 / SR) > band_hz] = 0
    return (0.1 * np.fft.irfft(spec, len(x))).astype(np.float32)


def _corpus(tmp_path, bands=(24000, 8000)):
    rows = []
    for i, band in enumerate(bands):
        rel = f"train/music/p/seg{i}.flac"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / rel, _noise(3.0, band, i), SR, subtype="PCM_16")
        rows.append(dict(path=rel, kind="music", package="p", seconds=3.0, band_hz=band, split="train"))
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_crops_carry_the_narrowest_band_they_span(tmp_path):
    pool = AudioPool(_corpus(tmp_path), "train", {"music": 1.0}, "cpu", 0)
    assert pool.band_of("music", 0, SR) == 24000  # inside the full-band segment
    assert pool.band_of("music", 4 * SR, SR) == 8000  # inside the 8 kHz one
    assert pool.band_of("music", 2 * SR, 2 * SR) == 8000  # straddling both
    x, _, bands = pool.crops(32, SR // 2)
    assert x.shape == (32, SR // 2) and set(bands.tolist()) <= {24000.0, 8000.0}


def test_cutoffs_are_drawn_under_each_targets_band(tmp_path):
    args = argparse.Namespace(frames=32, bank=256, seed=0, device="cpu", tilt=0.0, high_share=0.0)
    tr = Trainer(argparse.Namespace(**vars(args), out=tmp_path / "run"))
    pool = AudioPool(_corpus(tmp_path / "c", bands=(8000, 8000)), "train", {"music": 1.0}, "cpu", 0)
    for _ in range(4):
        hr, _, hr_mel, _, mask, band, _ = tr.batch(pool, 8)
        assert (band.hz == 8000).all()
        cutoffs = mel_centers()[mask.sum(1).long().numpy() - 1]  # the highest band under each cutoff
        assert (cutoffs < 8000 * CUTOFF_UNDER_BAND).all()
        assert band.mels.sum(1).min() > mask.sum(1).max()  # something to learn between cutoff and edge


def test_bands_above_a_targets_edge_carry_no_loss():
    band_hz = torch.tensor([24000.0, 8000.0])
    inside = in_band(band_hz)
    assert inside[0].all() and not inside[1, mel_centers() > 8000].any() and inside[1, mel_centers() < 7000].all()
    w = band_weights(torch.zeros(2, 80), inside)
    assert (w[1, torch.from_numpy(mel_centers()) > 8000] == 0).all()

    torch.manual_seed(0)
    voc = Vocoder(32, 2)
    mel = torch.randn(2, 80, 20)
    hr = torch.randn(2, 20 * 240)
    pad = torch.nn.functional.pad(hr, (N_FFT // 2, N_FFT // 2))
    spec = stft(pad)[:, :20]
    # a target that differs only above 8 kHz (its codec's silence vs. content) gives the same loss
    f = torch.fft.rfftfreq(hr.shape[-1], 1 / SR)
    silent = torch.fft.irfft(torch.fft.rfft(hr) * (f <= 7000), n=hr.shape[-1])
    spec_silent = stft(torch.nn.functional.pad(silent, (N_FFT // 2, N_FFT // 2)))[:, :20]
    narrow = torch.tensor([7000.0, 7000.0])
    a = vocoder_loss(voc, mel, spec, hr, narrow)
    b = vocoder_loss(voc, mel, spec_silent, silent, narrow)
    full = torch.tensor([24000.0, 24000.0])
    assert abs(a - b) < 0.05 * a < abs(vocoder_loss(voc, mel, spec, hr, full) - vocoder_loss(
        voc, mel, spec_silent, silent, full))


def test_target_band_is_what_batch_returns(tmp_path):
    args = argparse.Namespace(frames=16, bank=64, seed=0, device="cpu", tilt=0.0, high_share=0.0, out=tmp_path / "run")
    tr = Trainer(args)
    pool = AudioPool(_corpus(tmp_path / "c"), "train", {"music": 1.0}, "cpu", 0)
    hr, hr_spec, hr_mel, lr_mel, mask, band, _ = tr.batch(pool, 4)
    assert isinstance(band, TargetBand) and band.mels.shape == mask.shape == (4, 80)
    x0, cond = aligned(hr_mel, lr_mel)
    assert x0.shape == cond.shape == (4, 80, 15)


def test_cosine_decay_falls_from_one_to_its_floor_over_the_budget():
    from rtsr.training.train import cosine_decay

    assert [cosine_decay(d, 0.05) for d in (-1.0, 0.0, 0.5, 1.0, 2.0)] == pytest.approx([1, 1, 0.525, 0.05, 0.05])
    assert cosine_decay(0.5, 0.0) == pytest.approx(0.5) and cosine_decay(1.0, 0.0) == pytest.approx(0.0)


class _Fixed(torch.nn.Module):
    """A stand-in network that predicts a fixed mel whatever it is given."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, cond, mask, t, lossy=None):
        return self.out


def test_the_lsd_loss_weighs_bands_by_width_and_frames_by_their_root():
    frames, full = 6, TargetBand(in_band(torch.tensor([24000.0])), torch.tensor([24000.0]))
    x0, mask = torch.zeros(1, 80, frames), torch.zeros(1, 80)

    def loss(err: torch.Tensor, kind: str = "lsd") -> float:
        return float(regression_loss(_Fixed(err), x0, x0, mask, full, kind))

    # one error everywhere: the frames' root gives back its size, whatever the weights
    assert loss(torch.full((1, 80, frames), 0.5)) == pytest.approx(0.5, rel=1e-3)
    # the same error in the widest (top) band counts for more than in the narrowest (bottom) one
    top, bottom = torch.zeros(1, 80, frames), torch.zeros(1, 80, frames)
    top[:, -1], bottom[:, 0] = 1.0, 1.0
    assert loss(top) > 3 * loss(bottom)  # widths 10.8 and 1 bins: a root of their ratio
    assert loss(top, "l2") == pytest.approx(loss(bottom, "l2"))  # l2 counts every band alike
    # an error in one frame of six costs a sixth of its root; l2 would count the square
    one = torch.zeros(1, 80, frames)
    one[..., 0] = 2.0
    assert loss(one) == pytest.approx((math.sqrt(4 + LSD_EPS) + (frames - 1) * math.sqrt(LSD_EPS)) / frames)
    assert loss(one, "l2") == pytest.approx(4.0 / frames)


def test_the_level_loss_asks_a_swinging_band_for_its_mean_power():
    """A band that is loud in one frame and quiet in the rest: its mean log level (what l1/l2 ask
    for) sits far under its mean power; the level term is zero only at the mean power."""
    from rtsr.features import MEL_STD
    from rtsr.training.train import band_level

    frames, full = 4, TargetBand(in_band(torch.tensor([24000.0])), torch.tensor([24000.0]))
    x0, mask = torch.full((1, 80, frames), -1.0), torch.zeros(1, 80)
    x0[..., 0] = 1.0  # one frame 6 units (of log magnitude, 3 per normalised unit) louder
    assert torch.allclose(band_level(torch.full((1, 80, frames), 0.3)), torch.full((1, 80), 0.3))
    power_mean = -1.0 + math.log((math.exp(2 * 2 * MEL_STD) + frames - 1) / frames) / 2 / MEL_STD
    assert torch.allclose(band_level(x0), torch.full((1, 80), power_mean), atol=1e-5)
    assert power_mean > x0.mean() + 0.5

    def level_term(pred: float) -> float:
        net = _Fixed(torch.full((1, 80, frames), pred))
        return float(regression_loss(net, x0, x0, mask, full, "l2", level=1.0) - regression_loss(net, x0, x0, mask,
                                                                                                   full, "l2"))

    assert level_term(power_mean) == pytest.approx(0.0, abs=1e-8)
    assert level_term(float(x0.mean())) > 0.25


@pytest.mark.parametrize("mult", [3, 5])
def test_a_grown_denoiser_starts_where_the_shallower_one_ended(mult):
    """Deeper (new blocks as identities) and, with mult 5, wider block MLPs (new units' output
    weights zero, their input weights random so they learn)."""
    from rtsr.models.nets import Denoiser

    torch.manual_seed(0)
    small, deep = Denoiser(16, 2, kernel=3, emb_dim=16), Denoiser(16, 4, kernel=3, emb_dim=16, mult=mult)
    load_grown(deep, small.state_dict())
    x, mask, t = torch.randn(1, 80, 12), torch.zeros(1, 80), torch.zeros(1)
    with torch.no_grad():
        torch.testing.assert_close(deep(torch.zeros_like(x), x, mask, t), small(torch.zeros_like(x), x, mask, t),
                                   atol=0, rtol=0 if mult == 3 else 1e-6)
    assert deep.blocks[3].pw1.weight.abs().sum() > 0  # its new blocks are not dead: only their scale is 0
    new_in, new_out = deep.blocks[0].pw1.weight[48:], deep.blocks[0].pw2.weight[:, 48:]  # hidden units past 48
    assert (new_in.abs().sum() > 0) == (mult > 3) and not new_out.any()
    deep(torch.zeros_like(x), x, mask, t).square().mean().backward()
    assert (deep.blocks[0].pw2.weight.grad[:, 48:].abs().sum() > 0) == (mult > 3)
    assert deep.config.get("mult", 3) == mult and "mult" not in small.config  # shipped (mult 3) configs unchanged
    with pytest.raises(SystemExit, match="shallower"):
        load_grown(small, deep.state_dict())
    with pytest.raises(SystemExit, match="narrower"):
        load_grown(small, Denoiser(16, 2, kernel=3, emb_dim=16, mult=5).state_dict())


def test_a_denoiser_grown_with_the_codec_flag_starts_as_it_was_and_can_learn_from_the_flag():
    from rtsr.models.nets import Denoiser

    torch.manual_seed(0)
    plain, flagged = Denoiser(16, 2, kernel=3, emb_dim=16), Denoiser(16, 2, kernel=3, emb_dim=16, flags=1)
    load_grown(flagged, plain.state_dict())
    x, mask, t = torch.randn(2, 80, 12), torch.zeros(2, 80), torch.zeros(2)
    with torch.no_grad():
        want = plain(torch.zeros_like(x), x, mask, t)
        for lossy in (None, torch.tensor([0.0, 1.0])):  # the flag's weights start at zero: no effect yet
            torch.testing.assert_close(flagged(torch.zeros_like(x), x, mask, t, lossy=lossy), want)
        flagged.inp.weight[:, -1] = 1.0
        out = flagged(torch.zeros_like(x), x, mask, t, lossy=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], want[0])  # a clean item is untouched by the flag's weights
    assert not torch.allclose(out[1], want[1])
    with pytest.raises(SystemExit, match="shallower"):
        load_grown(plain, flagged.state_dict())  # nor can the flag be dropped


@pytest.mark.parametrize("kind, schedule", [("l1", "constant"), ("lsd", "cosine")])
def test_regression_stage_trains_from_the_joint_regression_and_resumes(tmp_path, kind, schedule):
    from rtsr.training.train import new_denoiser, train_regression

    args = argparse.Namespace(frames=16, bank=64, seed=0, device="cpu", tilt=0.0, high_share=0.0, out=tmp_path / "run",
                              batch=2,
                              lr=1e-3, budget_s=1.0, ckpt_s=60.0, log_every=1000, blocks=8, dilations=(1, 2, 4, 8),
                              channels=160, mult=3,
                              reg_loss=kind, level_loss=0.0, reg_schedule=schedule, codec_flag=False, init_model=None)
    tr = Trainer(args)
    start = new_denoiser(tr).state_dict()
    tr.save("joint", {"regression": start})
    rows = _corpus(tmp_path / "c")
    for line in (rows / "manifest.jsonl").read_text().splitlines():  # the same audio, as speech
        (rows / "manifest.jsonl").open("a").write(line.replace('"music"', '"speech"') + "\n")
    pool = AudioPool(rows, "train", {"speech": 1.0}, "cpu", 0)
    train_regression(tr, pool, "regression_speech")
    first = tr.load("regression_speech")
    assert first["iters"] > 0 and first["loss"] == kind
    assert any(not torch.equal(first["net"][k], start[k]) for k in start)  # it learned something
    train_regression(tr, pool, "regression_speech")  # resumes: the budget is spent, so nothing more is done
    assert tr.load("regression_speech")["iters"] == first["iters"]


def test_regression_stage_grows_the_codec_flag_onto_a_shipped_model(tmp_path):
    from rtsr.model import load_model
    from rtsr.models.nets import Denoiser
    from rtsr.training.export import export
    from rtsr.training.train import train_regression

    basic = load_model("basic")  # a shipped network without the flag: basic's, its flag column dropped
    plain = Denoiser(**{**basic.denoiser.config, "flags": 0})
    state = basic.denoiser.state_dict()
    plain.load_state_dict({**state, "inp.weight": state["inp.weight"][:, :plain.inp.in_channels]})
    shipped_dir = export(plain, basic.vocoder, tmp_path / "plain", "plain", 0, 1.0, {})
    args = argparse.Namespace(frames=16, bank=64, seed=0, device="cpu", tilt=0.0, high_share=0.0, out=tmp_path / "run",
                              batch=2, lr=0.0, budget_s=0.5, ckpt_s=60.0, log_every=1000, blocks=8,
                              channels=160, mult=3, dilations=(1, 2, 4, 8), reg_loss="l2", level_loss=0.0,
                              reg_schedule="constant", codec_flag=True, init_model=shipped_dir)
    tr = Trainer(args)
    train_regression(tr, AudioPool(_corpus(tmp_path / "c"), "train", {"music": 1.0}, "cpu", 0), "regression")
    got, shipped = tr.load("regression"), load_model(str(shipped_dir)).denoiser.state_dict()
    assert got["config"]["flags"] == 1 and got["iters"] > 0
    w = got["net"]["inp.weight"]
    torch.testing.assert_close(w[:, :-1], shipped["inp.weight"])  # lr 0: the shipped network, plus the flag
    assert not w[:, -1].any()
    assert all(torch.equal(got["net"][k], v) for k, v in shipped.items() if k != "inp.weight")


def test_an_averaged_model_holds_the_mean_of_its_sources_denoisers(tmp_path):
    from rtsr.model import SuperResModel
    from rtsr.training.export import average, export

    a, b = SuperResModel.random(seed=1), SuperResModel.random(seed=2)
    b.vocoder = a.vocoder  # checkpoints of one run share their vocoder
    dirs = [export(m.denoiser, m.vocoder, tmp_path / n, n, 2, 1.0, {"run": n}) for m, n in ((a, "a"), (b, "b"))]
    got = SuperResModel.from_dir(average(dirs, tmp_path / "avg", "avg", {}))
    sources = [SuperResModel.from_dir(d).denoiser.state_dict() for d in dirs]  # as exported (float16)
    for k, v in got.denoiser.state_dict().items():
        assert torch.allclose(v, (sources[0][k] + sources[1][k]) / 2, atol=1e-3 * (v.abs().max() + 1e-3)), k
    assert got.steps == 2 and got.info["training"]["averaged"] == [{"run": "a"}, {"run": "b"}]
    c = SuperResModel.random(seed=3)  # another vocoder: refused
    with pytest.raises(SystemExit, match="another vocoder"):
        average([dirs[0], export(c.denoiser, c.vocoder, tmp_path / "c", "c", 2, 1.0, {})], tmp_path / "x", "x", {})


def test_a_weighted_average_grows_a_network_without_the_codec_flag(tmp_path):
    from rtsr.model import SuperResModel
    from rtsr.models.nets import Denoiser
    from rtsr.training.export import average, export

    a = SuperResModel.random(seed=1)
    flagged = Denoiser(**{**a.denoiser.config, "flags": 1})
    dirs = [export(a.denoiser, a.vocoder, tmp_path / "a", "a", 2, 1.0, {}),
            export(flagged, a.vocoder, tmp_path / "b", "b", 2, 1.0, {})]
    sources = [SuperResModel.from_dir(d).denoiser.state_dict() for d in dirs]
    got = SuperResModel.from_dir(average(dirs, tmp_path / "avg", "avg", {}, weights=[3.0, 1.0]))
    assert got.denoiser.config["flags"] == 1 and got.info["training"]["average_weights"] == [3.0, 1.0]
    w = got.denoiser.state_dict()["inp.weight"]
    tol = 1e-3 * (w.abs().max() + 1e-3)
    assert torch.allclose(w[:, -1], sources[1]["inp.weight"][:, -1] / 4, atol=tol)  # the flag: 0 from a
    assert torch.allclose(w[:, :-1], (3 * sources[0]["inp.weight"] + sources[1]["inp.weight"][:, :-1]) / 4, atol=tol)
    with pytest.raises(SystemExit, match="one non-negative weight per model"):
        average(dirs, tmp_path / "x", "x", {}, weights=[1.0])
    wider = Denoiser(**{**a.denoiser.config, "channels": a.denoiser.config["channels"] * 2})
    with pytest.raises(SystemExit, match="another architecture"):  # a flag is grown, a width is not
        average([dirs[0], export(wider, a.vocoder, tmp_path / "w", "w", 2, 1.0, {})], tmp_path / "x", "x", {})
    config = a.denoiser.config
    grown = Denoiser(**{**config, "blocks": config["blocks"] + 1, "mult": 4, "flags": 1})  # deeper MLPs too
    got = SuperResModel.from_dir(average([dirs[0], export(grown, a.vocoder, tmp_path / "g", "g", 2, 1.0, {})],
                                         tmp_path / "avg2", "avg2", {}))
    assert got.denoiser.config == grown.config
    last, hidden = f"blocks.{config['blocks']}.scale", "blocks.0.pw2.weight"
    half = {k: v / 2 for k, v in SuperResModel.from_dir(tmp_path / "g").denoiser.state_dict().items()}
    torch.testing.assert_close(got.denoiser.state_dict()[last], half[last], atol=1e-3, rtol=1e-3)  # a's: 0
    torch.testing.assert_close(got.denoiser.state_dict()[hidden][:, -config["channels"]:],
                               half[hidden][:, -config["channels"]:], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("stage, flags", [("regression", ["--continued"]), ("regression_speech", ["--speech"])])
def test_a_grown_regression_network_is_exported_with_its_own_depth(tmp_path, stage, flags):
    from rtsr.model import SuperResModel
    from rtsr.models.nets import Denoiser
    from rtsr.training.export import main as export_main
    from rtsr.training.train import write_slim

    small, deep = Denoiser(16, 2, kernel=3, emb_dim=16), Denoiser(16, 3, kernel=3, emb_dim=16)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"ema": small.state_dict(), "vocoder": Vocoder().state_dict(), "regression": small.state_dict(),
                "config": small.config}, run / "joint.pt")
    torch.save({"net": deep.state_dict(), "iters": 1, "loss": "l2", "config": deep.config}, run / f"{stage}.pt")
    write_slim(run, tmp_path / "slim")
    export_main(["--slim", str(tmp_path / "slim"), "--name", "t", "--regression", *flags, "--out", str(tmp_path / "m")])
    assert len(SuperResModel.from_dir(tmp_path / "m").denoiser.blocks) == 3


def test_a_run_started_from_a_shipped_model_is_exported_with_that_models_vocoder(tmp_path):
    from rtsr.model import SuperResModel, load_model
    from rtsr.models.nets import Denoiser
    from rtsr.training.export import main as export_main
    from rtsr.training.train import write_slim

    net = Denoiser(16, 2, kernel=3, emb_dim=16, flags=1)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"net": net.state_dict(), "iters": 1, "loss": "l2", "config": net.config}, run / "regression.pt")
    write_slim(run, tmp_path / "slim")  # no joint stage: no nets_basic.pt
    args = ["--slim", str(tmp_path / "slim"), "--name", "t", "--regression", "--continued",
            "--out", str(tmp_path / "m")]
    with pytest.raises(SystemExit, match="--vocoder-from"):
        export_main(args)
    export_main([*args, "--vocoder-from", "basic"])
    got = SuperResModel.from_dir(tmp_path / "m")
    assert got.denoiser.config["flags"] == 1
    shipped = load_model("basic").vocoder.state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in got.vocoder.state_dict().items())


def test_every_codec_level_a_pair_may_draw_is_one_libsndfile_takes():
    x = _noise(0.5, 24000, 6)
    for codec in CODECS:
        for level in codec.levels:  # the draw is uniform between these ends
            assert len(encode_decode(x, codec, level)) == len(x)


def test_codec_round_trip_keeps_length_and_timing_and_cuts_the_band():
    x = _noise(1.5, 24000, 5)
    for codec in CODECS:
        y = encode_decode(x, codec, 0.95)
        assert len(y) == len(x)
        lags = range(-20, 21)
        corr = [float(np.dot(x[100:-100], np.roll(y, -d)[100:-100])) for d in lags]
        assert lags[int(np.argmax(corr))] == 0  # no encoder delay left
        f = np.fft.rfftfreq(len(y), 1 / SR)
        p = np.abs(np.fft.rfft(y)) ** 2
        assert p[f > 17000].mean() < 1e-3 * p[(f > 1000) & (f < 4000)].mean()  # a low quality's band ends under 17 kHz


def test_codec_pairs_are_declared_at_their_detected_edge_under_the_targets_band(tmp_path):
    args = argparse.Namespace(frames=32, bank=64, seed=0, device="cpu", tilt=0.0, high_share=0.0,
                              codec_share=1.0, codec_pairs=6, out=tmp_path / "run")
    tr = Trainer(args)
    pool = AudioPool(_corpus(tmp_path / "c"), "train", {"music": 1.0}, "cpu", 0)
    tr.add_codec_pairs(pool)
    pairs = tr.codec
    assert 0 < len(pairs.hr) <= 6 and pairs.lr.shape == pairs.hr.shape
    assert (pairs.cutoff <= CUTOFF_UNDER_BAND * pairs.band).all()
    for hr, lr, cut in zip(pairs.hr, pairs.lr, pairs.cutoff, strict=True):  # lr: hr through a codec, at its edge
        assert cut.item() in {band_of_48k([lr.numpy()[:, None]], 1, rate).hz for rate in (44100, 48000)}
        assert torch.corrcoef(torch.stack([hr, lr]))[0, 1] > 0.5
    hr, _, _, _, mask, band, lossy = tr.batch(pool, 8)  # codec_share 1: all but one item are codec pairs
    assert lossy.tolist() == [0.0] + [1.0] * 7
    masks = cutoff_mask(pairs.cutoff)
    assert all(any(torch.equal(m, p) for p in masks) for m in mask[1:])
    assert all(any(torch.equal(h, p[MARGIN:-MARGIN]) for p in pairs.hr) for h in hr[1:])
    assert not any(torch.equal(hr[0], p[MARGIN:-MARGIN]) for p in pairs.hr)  # one crop for the simulated degradations
