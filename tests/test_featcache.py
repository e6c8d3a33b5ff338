"""Cached feature pairs: shards hold what the trainer's batches would, a stopped render resumes to the
same bytes, and the regression stage trains from the cache alone and exports a loadable model."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsr.features import SR, cutoff_mask
from rtsr.training.featcache import FLOOR, CachedPairs, Segments, Shard, render, render_shard, write_shard
from rtsr.training.train import CUTOFF_UNDER_BAND, in_band

FRAMES = 24


def _corpus(root, seconds=1.5):
    """Noise segments of each kind, one full-band and one band-limited to 8 kHz per kind and split."""
    rows, rng = [], np.random.default_rng(0)
    for split in ("train", "val"):
        for kind in ("speech", "music", "sfx"):
            for band in (24000, 8000):
                x = rng.standard_normal(int(seconds * SR))
                spec = np.fft.rfft(x)
                spec[np.fft.rfftfreq(len(x), 1 / SR) > band] = 0
                rel = f"{split}/{kind}/seg{band}.flac"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(root / rel, 0.1 * np.fft.irfft(spec, len(x)), SR, subtype="PCM_16")
                rows.append(dict(path=rel, kind=kind, package="p", seconds=seconds, band_hz=band, split=split))
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_shard_holds_band_aware_pairs_and_loads_back_as_training_batches(tmp_path):
    corpus = _corpus(tmp_path / "c")
    shard = render_shard(Segments(corpus, "train", {"speech": 1, "music": 1, "sfx": 1}), 0, 8, FRAMES, 0, False, 16)
    assert shard.hr.shape == shard.lr.shape == (8, 80, FRAMES) and shard.hr.dtype == np.float16
    assert (shard.cutoff <= shard.band * CUTOFF_UNDER_BAND * 1.04 + 1).all()  # drawn under each band
    assert set(shard.band.tolist()) <= {24000.0, 8000.0} and not shard.lossy.any()
    assert (shard.lr.astype(np.float32) <= shard.hr.astype(np.float32) + 0.5).mean() > 0.9  # a low-pass

    codec = render_shard(Segments(corpus, "train", {"music": 1}), 1, 4, FRAMES, 0, True)
    assert len(codec.hr) <= 4 and codec.lossy.all() and (codec.cutoff <= codec.band * CUTOFF_UNDER_BAND).all()

    write_shard(tmp_path / "cache" / "train" / "shard_00000.npz", shard)
    pairs = CachedPairs(tmp_path / "cache", "train", "cpu", 0)
    torch.testing.assert_close(pairs.hr, torch.from_numpy(shard.hr))
    hr, lr, mask, band, lossy = pairs.draw(5, FRAMES)
    stored = [torch.from_numpy(shard.hr[i]).float() for i in range(8)]
    assert all(any(torch.equal(h, s) for s in stored) for h in hr)  # whole sequences, level kept
    assert mask.shape == (5, 80) and band.mels.shape == (5, 80) and not lossy.any()
    torch.testing.assert_close(band.mels, in_band(band.hz))

    assert pairs.draw(3, FRAMES - 8)[0].shape == (3, 80, FRAMES - 8)  # windows of them
    hr, *_ = pairs.draw(32, FRAMES, max_drop_db=12.0)  # up to 12 dB quieter: a shift, floored at silence
    assert hr.min() >= FLOOR
    most = 12.0 * np.log(10) / 20 / 3.0  # 12 dB in normalised log-mel units (MEL_STD 3)

    def shifted(h: torch.Tensor, s: torch.Tensor) -> bool:  # h is s lowered by at most 12 dB
        d = (h - s)[s > FLOOR + most + 0.01]
        return bool(-most - 1e-3 <= d.min() and d.max() - d.min() < 1e-2 and d.max() <= 1e-6)
    assert all(any(shifted(h, s) for s in stored) for h in hr)


def test_codec_items_are_drawn_at_their_share(tmp_path):
    n = 8
    lossy = np.zeros(n, np.uint8)
    lossy[-2:] = 1
    mels = np.zeros((n, 80, FRAMES), np.float16)
    write_shard(tmp_path / "train" / "shard_00000.npz",
                Shard(mels, mels, np.full(n, 4000, np.float32), np.full(n, 24000, np.float32), lossy))
    pairs = CachedPairs(tmp_path, "train", "cpu", 0)
    flags = torch.cat([pairs.draw(16, FRAMES, codec_share=0.5)[4] for _ in range(20)])
    assert 0.35 < flags.mean() < 0.65
    assert pairs.draw(4, FRAMES, codec_share=1.0)[4].tolist() == [0, 1, 1, 1]  # one simulated item left
    _, _, mask, *_ = pairs.draw(2, FRAMES)
    torch.testing.assert_close(mask, cutoff_mask(torch.full((2,), 4000.0)))


def test_a_stopped_render_resumes_to_the_same_bytes_and_grows_with_items(tmp_path):
    corpus, out = _corpus(tmp_path / "c"), tmp_path / "cache"
    render(corpus, out, "train", 8, 0, 4, FRAMES, 0, 16)
    files = sorted((out / "train").glob("*.npz"))
    assert [f.name for f in files] == ["shard_00000.npz", "shard_00001.npz"]
    first = files[1].read_bytes()
    files[1].unlink()
    (out / "train" / "shard_00001.tmp.npz").write_bytes(b"half a shard")  # what a kill leaves behind
    render(corpus, out, "train", 12, 0, 4, FRAMES, 0, 16)
    assert files[1].read_bytes() == first
    assert len(CachedPairs(out, "train", "cpu", 0).clean) == 12  # the leftover .tmp is not read
    with pytest.raises(SystemExit, match="rendered with"):
        render(corpus, out, "train", 12, 0, 4, FRAMES + 1, 0, 16)


def test_the_regression_stage_trains_from_the_cache_and_exports_a_model(tmp_path):
    from rtsr.model import SuperResModel
    from rtsr.training import export, train

    corpus, cache, run = _corpus(tmp_path / "c"), tmp_path / "cache", tmp_path / "run"
    for split in ("train", "val"):
        render(corpus, cache, split, 4, 0, 4, FRAMES, 0, 16)
    args = ["--cache", str(cache), "--out", str(run), "--stages", "regression", "--budgets", "1", "--frames", "16",
            "--batch", "2", "--blocks", "2", "--mult", "2", "--codec-flag", "--reg-loss", "l2",
            "--slim-dir", str(run / "slim"), "--device", "cpu"]
    train.main(args)
    ck = torch.load(run / "regression.pt")
    assert ck["iters"] > 0 and ck["config"]["mult"] == 2 and np.isfinite(ck["val"])
    train.main(args)  # resumes: the budget is spent, nothing more is done
    assert torch.load(run / "regression.pt")["iters"] == ck["iters"]
    export.main(["--slim", str(run / "slim"), "--name", "big", "--regression", "--continued",
                 "--vocoder-from", "basic", "--out", str(tmp_path / "m")])
    model = SuperResModel.from_dir(tmp_path / "m")
    assert model.denoiser.config["blocks"] == 2 and model.denoiser.blocks[0].pw1.out_channels == 320
    x = torch.randn(1, 80, 8)
    with torch.no_grad():
        assert model.denoiser(torch.zeros_like(x), x, torch.zeros(1, 80), torch.zeros(1)).isfinite().all()


def test_a_few_step_generative_model_trains_from_the_cache_and_exports(tmp_path):
    """`teacher` then `distill` on cached pairs (the codec flag reaching every network call), a
    2-step student exported with a shipped vocoder, loadable, and its sampler told each stream's flag."""
    from rtsr.model import SuperResModel
    from rtsr.training import export, train

    corpus, cache, run = _corpus(tmp_path / "c"), tmp_path / "cache", tmp_path / "run"
    render(corpus, cache, "train", 4, 0, 4, FRAMES, 0, 16)
    args = ["--cache", str(cache), "--out", str(run), "--stages", "teacher,distill", "--budgets", "1,1",
            "--frames", "16", "--batch", "2", "--blocks", "2", "--codec-flag", "--guidance", "1.0",
            "--slim-dir", str(run / "slim"), "--device", "cpu"]
    train.main(args)
    assert torch.load(run / "teacher.pt")["iters"] > 0
    assert all((run / f"student{k}.pt").exists() for k in (16, 8, 4, 2, 1))
    with pytest.raises(SystemExit, match="number"):
        train.main([*args[:-2], "--guidance", "auto", "--device", "cpu"])
    export.main(["--slim", str(run / "slim"), "--name", "gen", "--student", "2", "--vocoder-from", "basic",
                 "--out", str(tmp_path / "m")])
    model = SuperResModel.from_dir(tmp_path / "m")
    assert model.steps == 2 and model.denoiser.flags == 1
    x = torch.randn(2, 80, 4)
    outs = [model.run(model.new_state(1, lossy=flag), x[:1], x[:1], torch.full((4,), 6000.0), x[1:])
            for flag in (False, True)]
    assert all(o.isfinite().all() for o in outs) and not torch.equal(*outs)
