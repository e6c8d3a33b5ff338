"""Cached feature pairs: the degradations rendered once into compact log-mel pairs, reused by every
epoch and every run, so a training step costs the network alone.

    python -m rtsr.training.featcache --data corpus --out runs/cache --items 40000 --codec-items 4000
    python -m rtsr.training.train --cache runs/cache --out runs/big --stages regression ...

Each shard (`SPLIT/shard_NNNNN.npz`) holds a fixed number of crops drawn from the corpus in the
training mix of kinds, each with its target's and its degraded input's normalised log-mel (float16,
(items, N_MELS, frames)), the declared cutoff, the target's band edge and whether the input came
from a real codec round trip (`lossy`). Crops, gains and degradations are those of
`train.Trainer.batch` (band-aware cutoffs from `degrade.DegradationBank`, real LAME/Vorbis pairs
from `codec.CodecPairs` kept at the band the runtime detector finds); a shard is a function of its
index and the seed, written whole or not at all, so a stopped render resumes where it stopped and a
larger `--items` adds shards. Codec shards come last: encoding costs ~0.2 s a crop, a network step
far less, so a few thousand pairs are made once and drawn at `--codec-share` of every batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch

from rtsr.features import HOP, LOG_FLOOR, MEL_MEAN, MEL_STD, SR, cutoff_mask
from rtsr.training.codec import CodecPairs
from rtsr.training.degrade import DegradationBank
from rtsr.training.train import CUTOFF_UNDER_BAND, MARGIN, MIX, TargetBand, features, in_band

log = logging.getLogger("rtsr.featcache")
SILENT = 1e-7  # mean square under which a crop teaches nothing about high bands (as AudioPool)
FLOOR = (math.log(LOG_FLOOR) - MEL_MEAN) / MEL_STD  # the normalised log-mel of silence


class Segments:
    """A split's corpus segments, drawn by kind (the training mix) and by length within a kind, and
    read one crop at a time (memory does not grow with the corpus)."""

    def __init__(self, root: Path, split: str, mix: dict[str, float]):
        rows = [json.loads(line) for line in open(root / "manifest.jsonl") if line.strip()]
        rows = [r for r in rows if r.get("split", split) == split]
        self.root, self.kinds = root, {}
        for kind, weight in mix.items():
            mine = [r for r in rows if r["kind"] == kind]
            if mine and weight > 0:
                self.kinds[kind] = (weight, mine, np.array([r["seconds"] for r in mine], np.float64))
        if not self.kinds:
            raise SystemExit(f"no {split} audio of kinds {sorted(mix)} under {root}")

    def crop(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, float]:
        """One crop (float32, zero-padded if its segment is shorter) and its segment's band edge (Hz);
        near-silent draws are redrawn up to 8 times."""
        names = list(self.kinds)
        weights = np.array([self.kinds[k][0] for k in names])
        _, rows, seconds = self.kinds[names[rng.choice(len(names), p=weights / weights.sum())]]
        for _ in range(8):
            row = rows[rng.choice(len(rows), p=seconds / seconds.sum())]
            start = int(rng.integers(0, max(int(row["seconds"] * SR) - length, 0) + 1))
            x = sf.read(self.root / row["path"], start=start, frames=length, dtype="float32", always_2d=True)[0][:, 0]
            x = np.pad(x, (0, length - len(x)))
            if np.square(x).mean() > SILENT:
                break
        return x, float(row.get("band_hz", SR / 2))


class Shard(NamedTuple):
    """Feature pairs: target and input log-mel (N, N_MELS, frames) float16, cutoff and target band
    edge (N,) Hz, lossy (N,) 1 for a real codec round trip."""

    hr: np.ndarray
    lr: np.ndarray
    cutoff: np.ndarray
    band: np.ndarray
    lossy: np.ndarray


def render_shard(segments: Segments, index: int, items: int, frames: int, seed: int, codec: bool,
                 bank_size: int = 256) -> Shard:
    """`items` crops through simulated degradations (a bank of its own per shard, so the cache
    holds more distinct filters than one run's bank) or, with `codec`, through real codecs (only
    the pairs whose detected edge lies under their target's band are kept)."""
    rng = np.random.default_rng([seed, index])
    length = frames * HOP + 2 * MARGIN
    crops, bands = zip(*(segments.crop(rng, length) for _ in range(items)), strict=True)
    gain = 10 ** (rng.uniform(-20, 3, items) / 20)  # AudioPool's level range
    hr = torch.from_numpy(np.stack(crops) * gain[:, None].astype(np.float32))
    band = torch.tensor(bands, dtype=torch.float32)
    if codec:
        try:
            pairs = CodecPairs.make(hr, band, CUTOFF_UNDER_BAND, int(rng.integers(2**31)))
        except ValueError:  # none kept: an empty shard, so a resumed render does not try it again
            pairs = CodecPairs(hr[:0], hr[:0], band[:0], band[:0])
        hr, lr, cutoff, band = pairs.hr, pairs.lr, pairs.cutoff, pairs.band
    else:
        bank = DegradationBank(length, bank_size, int(rng.integers(2**31)))
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        lr, cutoff = bank.degrade(hr, gen, max_cutoff=band * CUTOFF_UNDER_BAND)
    _, hr_mel, lr_mel = features(hr[:, MARGIN:-MARGIN], lr[:, MARGIN:-MARGIN], frames)
    return Shard(hr_mel.half().numpy(), lr_mel.half().numpy(), cutoff.numpy().astype(np.float32),
                 band.numpy(), np.full(len(hr), int(codec), np.uint8))


def write_shard(path: Path, shard: Shard) -> None:
    """Whole or not at all: a stopped render leaves no half shard to be read as a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **shard._asdict())
    os.replace(tmp, path)


def render(data: Path, out: Path, split: str, items: int, codec_items: int, shard_items: int, frames: int,
           seed: int, bank_size: int = 256, jobs: int = 1) -> None:
    """Every missing shard of `split`: simulated ones for `items`, then codec ones for `codec_items`
    crops (fewer pairs come out: those without a detectable edge under their band are dropped),
    `jobs` shards at a time."""
    (out / split).mkdir(parents=True, exist_ok=True)
    meta = out / "cache.json"
    want = {"frames": frames, "seed": seed, "bank": bank_size}
    if meta.exists() and {k: json.loads(meta.read_text())[k] for k in want} != want:
        raise SystemExit(f"{out} was rendered with {meta.read_text().strip()}, not {want}")
    meta.write_text(json.dumps({**want, "corpus": str(data)}) + "\n")
    segments = Segments(data, split, MIX)
    plan = [("shard", i, False) for i in range(math.ceil(items / shard_items))]
    plan += [("codec", i, True) for i in range(math.ceil(codec_items / shard_items))]
    salt = {"train": 0, "val": 1}.get(split, 2) * 1_000_003
    todo = [(path, segments, i + salt + int(codec) * 100_003, shard_items, frames, seed, codec, bank_size)
            for prefix, i, codec in plan if not (path := out / split / f"{prefix}_{i:05d}.npz").exists()]
    with Pool(jobs) if jobs > 1 else nullcontext() as pool:
        for path, n in (pool.imap_unordered(_render_one, todo) if pool else map(_render_one, todo)):
            log.info("%s: %d items", path, n)


def _render_one(job: tuple) -> tuple[Path, int]:
    path, *args = job
    torch.set_num_threads(1)
    shard = render_shard(*args)
    write_shard(path, shard)
    return path, len(shard.cutoff)


class CachedPairs:
    """Every shard of a split in memory (float16), drawn as training batches: a random window of
    each stored sequence and a random level below the stored one (exact in the log-mel domain:
    a shift, floored at silence), so epochs over the cache differ."""

    def __init__(self, root: Path, split: str, device: str, seed: int):
        files = sorted((root / split).glob("*_[0-9]*[0-9].npz"))
        if not files:
            raise SystemExit(f"no feature shards under {root / split}: render them with rtsr.training.featcache")
        loaded = [np.load(f) for f in files]
        self.hr, self.lr = (torch.from_numpy(np.concatenate([s[k] for s in loaded])).to(device) for k in ("hr", "lr"))
        self.cutoff, self.band = (torch.from_numpy(np.concatenate([s[k] for s in loaded])).to(device)
                                  for k in ("cutoff", "band"))
        lossy = np.concatenate([s["lossy"] for s in loaded]).astype(bool)
        self.clean, self.lossy = (torch.from_numpy(np.flatnonzero(m)) for m in (~lossy, lossy))
        self.gen = torch.Generator().manual_seed(seed)
        log.info("%s cache: %d simulated + %d codec pairs of %d frames, %.2f GB", split, len(self.clean),
                 len(self.lossy), self.hr.shape[-1], 2 * self.hr.nbytes / 1e9)

    def draw(self, size: int, frames: int, codec_share: float = 0.0, max_drop_db: float = 0.0):
        """(hr_mel, lr_mel, mask, band, lossy) as `train.Trainer.batch` gives them: `codec_share`
        of the items from the codec pairs (at least one left simulated), `frames` of each."""
        g = self.gen
        k = min(size - 1, int((torch.rand(size, generator=g) < codec_share).sum())) if len(self.lossy) else 0
        idx = torch.cat([self.clean[torch.randint(len(self.clean), (size - k,), generator=g)],
                         self.lossy[torch.randint(max(len(self.lossy), 1), (k,), generator=g)]])
        stored = self.hr.shape[-1]
        if frames > stored:
            raise SystemExit(f"--frames {frames} is longer than the cache's {stored}")
        start = torch.randint(stored - frames + 1, (size,), generator=g)
        window = (start[:, None] + torch.arange(frames)).to(self.hr.device)
        hr, lr = (torch.stack([m[i, :, w] for i, w in zip(idx.tolist(), window, strict=True)]).float()
                  for m in (self.hr, self.lr))
        shift = (torch.rand(size, 1, 1, generator=g) * -max_drop_db * math.log(10) / 20 / MEL_STD).to(hr.device)
        hr, lr = (hr + shift).clamp_min(FLOOR), (lr + shift).clamp_min(FLOOR)
        band, cutoff = self.band[idx.to(self.band.device)], self.cutoff[idx.to(self.band.device)]
        lossy = (torch.arange(size, device=hr.device) >= size - k).float()
        return hr, lr, cutoff_mask(cutoff), TargetBand(in_band(band), band), lossy


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="corpus folder with manifest.jsonl")
    p.add_argument("--out", required=True, type=Path, help="cache folder (under runs/: outside git)")
    p.add_argument("--items", type=int, default=40000, help="simulated training pairs (rounded up to shards)")
    p.add_argument("--codec-items", type=int, default=4000,
                   help="crops through real codecs (about half are kept: those with an edge under their band)")
    p.add_argument("--val-items", type=int, default=2048, help="simulated validation pairs")
    p.add_argument("--shard-items", type=int, default=1024)
    p.add_argument("--frames", type=int, default=160, help="stored frames per pair (training takes windows)")
    p.add_argument("--bank", type=int, default=256, help="simulated degradations per shard (each shard its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="shards rendered at once")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    for split, items, codec in (("val", a.val_items, 0), ("train", a.items, a.codec_items)):
        render(a.data, a.out, split, items, codec, a.shard_items, a.frames, a.seed, a.bank, a.jobs)


if __name__ == "__main__":
    main()
