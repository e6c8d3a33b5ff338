"""Training: diffusion teacher + vocoder + regression baseline, then progressive distillation.

    python -m rtsr.training.train --data corpus --out runs/basic --stage joint --budget-s 3600
    python -m rtsr.training.train --data corpus --out runs/basic --stage distill --budget-s 1800
    python -m rtsr.training.train --data corpus --out runs/basic --stage speech --budget-s 1800

Every stage is bounded by wall time (so a run fits a machine lease), checkpoints to OUT every
`--ckpt-s` seconds and resumes from its last checkpoint when started again.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from rtsr.features import HOP, MEL_MEAN, MEL_STD, N_FFT, SR, bin_freqs, cutoff_mask, istft, log_mel, mel_basis, stft
from rtsr.model import load_model
from rtsr.models.diffusion import ddim_update, distill_target, guided_v, noisy, sample, v_target
from rtsr.models.nets import Denoiser, Vocoder, to_complex
from rtsr.training.codec import CodecPairs
from rtsr.training.degrade import DegradationBank, random_tilt

log = logging.getLogger("rtsr.train")
FULL_BAND_HZ = SR / 2
CUTOFF_UNDER_BAND = 0.9  # simulated cutoffs stay this far under the target's own band edge
MARGIN = 4800  # samples each side degraded with the crop, then cut: hides FFT wrap-around
LOOKAHEAD = 1  # conditioning frames the denoiser sees ahead of the frame it denoises
TEACHER_STEPS = 32
MIX = {"speech": 0.35, "music": 0.4, "sfx": 0.25}  # each batch's share of each kind
VAL_BATCHES = 32  # cached validation batches scored at each checkpoint (a forward pass each)
LSD_EPS = 1e-4  # keeps the root's gradient finite on frames the network already gets right


class AudioPool:
    """All training audio on the device, sampled as random crops with per-kind weights; each crop
    carries the band edge of its target (the narrowest `band_hz` of the segments it spans)."""

    def __init__(self, root: Path, split: str, kinds: dict[str, float], device: str, seed: int):
        rows = [json.loads(line) for line in open(root / "manifest.jsonl") if line.strip()]
        rows = [r for r in rows if r.get("split", split) == split and r["kind"] in kinds]
        if not rows:
            raise SystemExit(f"no {split} audio of kinds {sorted(kinds)} under {root}")
        self.kinds, self.audio, self.starts, self.bands = [], {}, {}, {}
        for kind, weight in kinds.items():
            mine = [r for r in rows if r["kind"] == kind]
            clips = [sf.read(root / r["path"], dtype="int16")[0] for r in mine]
            if not clips or weight <= 0:
                continue
            self.kinds.append((kind, weight))
            self.audio[kind] = torch.from_numpy(np.concatenate(clips)).to(device)  # int16: half the RAM
            self.starts[kind] = np.cumsum([0] + [len(c) for c in clips])
            self.bands[kind] = np.array([r.get("band_hz", FULL_BAND_HZ) for r in mine], np.float32)
            log.info("%s %s: %d files, %.2f h", split, kind, len(clips), len(self.audio[kind]) / 48000 / 3600)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def band_of(self, kind: str, start: int, length: int) -> float:
        """The narrowest band edge among the segments that [start, start + length) spans."""
        first = np.searchsorted(self.starts[kind], start, side="right") - 1
        last = np.searchsorted(self.starts[kind], start + length, side="left") - 1
        return float(self.bands[kind][first:max(last, first) + 1].min())

    def crops(self, batch: int, length: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Random crops, skipping near-silent ones (they teach nothing about high bands), with the
        band edge of each (Hz)."""
        w = torch.tensor([k[1] for k in self.kinds])
        picks = torch.multinomial(w / w.sum(), batch, replacement=True, generator=self.gen)
        out, names, bands = [], [], []
        for p in picks.tolist():
            kind = self.kinds[p][0]
            a = self.audio[kind]
            for _ in range(8):
                s = int(torch.randint(0, max(len(a) - length, 1), (1,), generator=self.gen))
                x = a[s:s + length].float() / 32768.0
                if len(x) == length and x.square().mean() > 1e-7:
                    break
            out.append(F.pad(x, (0, length - len(x))))
            names.append(kind)
            bands.append(self.band_of(kind, s, length))
        gain = 10 ** (torch.empty(batch).uniform_(-20, 3, generator=self.gen) / 20)
        return torch.stack(out) * gain.to(out[0].device)[:, None], names, torch.tensor(bands, device=out[0].device)


def features(hr: torch.Tensor, lr: torch.Tensor, frames: int):
    """Waveforms (B, samples) -> HR spectrum, HR mel, LR mel (B, mels, frames), cropped margins."""
    pad = (N_FFT // 2, N_FFT // 2)
    hr_spec = stft(F.pad(hr, pad))[:, :frames]
    lr_spec = stft(F.pad(lr, pad))[:, :frames]
    return hr_spec, log_mel(hr_spec).transpose(1, 2), log_mel(lr_spec).transpose(1, 2)


class TargetBand(NamedTuple):
    """Each target's own band: (B, N_MELS) 1 for mel bands wholly inside it, and its edge in Hz (B,)."""

    mels: torch.Tensor
    hz: torch.Tensor


# a training batch for the regression stage: HR and LR log-mel, cutoff mask, target band, lossy flag
Draw = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, TargetBand, torch.Tensor]]


@cache
def mel_tops() -> np.ndarray:
    """The highest frequency (Hz) each mel band's triangle reaches."""
    fb, f = mel_basis(), bin_freqs()
    return np.array([f[np.flatnonzero(row)[-1]] for row in fb], np.float32)


def in_band(band_hz: torch.Tensor) -> torch.Tensor:
    """(B,) band edge in Hz -> (B, N_MELS) 1 for the mel bands wholly inside each target's band.

    Why: above its edge a target holds a codec's silence, no ground truth for a full-band output;
    every loss leaves those bands out, so the model learns content there only from targets that
    have it."""
    tops = torch.from_numpy(mel_tops()).to(band_hz.device)
    return (tops[None, :] <= band_hz[:, None]).float()


def band_weights(mask: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Loss weight per mel band: the bands above the cutoff are the ones to learn, those above the
    target's own band not at all."""
    return ((1.0 - 0.9 * mask) * inside)[:, :, None]


def bins_in_band(band_hz: torch.Tensor, n_fft: int) -> torch.Tensor:
    """(B, 1, n_fft/2+1) 1 for the STFT bins of an n_fft transform below each target's band edge."""
    f = torch.fft.rfftfreq(n_fft, 1.0 / SR, device=band_hz.device)
    return (f[None, :] <= band_hz[:, None]).float()[:, None, :]


def vocoder_loss(voc: Vocoder, mel: torch.Tensor, hr_spec: torch.Tensor, hr: torch.Tensor, band_hz: torch.Tensor):
    """Log-magnitude and multi-resolution STFT losses over each target's own band."""
    out = voc(mel).float()  # the complex and FFT ops below run in float32 under autocast
    spec = to_complex(out)
    inside = bins_in_band(band_hz, N_FFT)
    loss = ((out[:, :, 0] - torch.log(hr_spec.abs().clamp_min(1e-5))).abs() * inside).sum() / (
        inside.sum() * out.shape[1]).clamp_min(1)
    y = istft(spec)[:, :hr.shape[-1]]
    for n_fft in (256, 1024, 2048):
        win = torch.hann_window(n_fft, device=y.device)
        inside = bins_in_band(band_hz, n_fft).transpose(1, 2)  # torch.stft is (B, bins, frames)
        sy = torch.stft(y, n_fft, n_fft // 4, window=win, return_complex=True).abs() * inside
        sr = torch.stft(hr, n_fft, n_fft // 4, window=win, return_complex=True).abs() * inside
        log_err = (torch.log(sy.clamp_min(1e-5)) - torch.log(sr.clamp_min(1e-5))).abs()
        loss = loss + (log_err * inside).sum() / (inside.sum() * sy.shape[-1]).clamp_min(1)
        loss = loss + torch.linalg.norm(sy - sr) / torch.linalg.norm(sr).clamp_min(1e-5)
    return loss


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = args.device
        self.frames = args.frames
        self.samples = self.frames * HOP
        self.bank = (DegradationBank(self.samples + 2 * MARGIN, args.bank, args.seed, self.device, args.high_share)
                     if args.bank else None)  # none when training from cached features
        self.amp = torch.autocast("cuda", torch.bfloat16) if self.device.startswith("cuda") else None
        self.codec: CodecPairs | None = None  # real-codec pairs mixed into batches (--codec-share)

    def add_codec_pairs(self, pool: AudioPool) -> None:
        """Make `--codec-pairs` real-codec pairs from the pool's crops (see rtsr.training.codec)."""
        crops, _, bands = pool.crops(self.args.codec_pairs, self.samples + 2 * MARGIN)
        self.codec = CodecPairs.make(crops, bands, CUTOFF_UNDER_BAND, self.args.seed)
        log.info("codec pairs: %d of %d crops kept, edges %.1f-%.1f kHz", len(self.codec.hr), len(crops),
                 self.codec.cutoff.min() / 1e3, self.codec.cutoff.max() / 1e3)

    def batch(self, pool: AudioPool, size: int):
        """Targets, their spectra and mels, the degraded input's mel, the cutoff's mel mask, the
        targets' in-band mel mask and edge (Hz), and which items are codec-decoded (1) rather than
        simulated (0). Cutoffs are drawn under each target's band edge."""
        k = self.codec_count(size, pool.gen)
        raw, _, band = pool.crops(size - k, self.samples + 2 * MARGIN)
        if self.args.tilt:
            raw = random_tilt(raw, self.args.tilt, pool.gen)
        lr, cutoff = self.bank.degrade(raw, max_cutoff=band * CUTOFF_UNDER_BAND)
        if k:  # the last k items of the batch are real-codec pairs
            c = self.codec.draw(k, pool.gen)
            raw, lr, cutoff, band = (torch.cat(pair) for pair in
                                     zip((raw, lr, cutoff, band), (c.hr, c.lr, c.cutoff, c.band), strict=True))
        hr, lr = raw[:, MARGIN:-MARGIN], lr[:, MARGIN:-MARGIN]
        hr_spec, hr_mel, lr_mel = features(hr, lr, self.frames)
        lossy = (torch.arange(size, device=hr.device) >= size - k).float()
        return hr, hr_spec, hr_mel, lr_mel, cutoff_mask(cutoff), TargetBand(in_band(band), band), lossy

    def codec_count(self, size: int, gen: torch.Generator) -> int:
        """How many of a batch's items come from the codec pool: each with probability `--codec-share`,
        at least one item left for the simulated degradations."""
        if self.codec is None:
            return 0
        return min(size - 1, int((torch.rand(size, generator=gen) < self.args.codec_share).sum()))

    def autocast(self):
        return self.amp if self.amp is not None else torch.autocast("cpu", enabled=False)

    def save(self, name: str, state: dict) -> None:
        tmp = self.out / f"{name}.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out / f"{name}.pt")

    def load(self, name: str) -> dict | None:
        p = self.out / f"{name}.pt"
        return torch.load(p, map_location=self.device) if p.exists() else None


def new_denoiser(tr: Trainer) -> Denoiser:
    """A denoiser of the run's architecture (`--channels`, `--blocks`, `--mult`, `--dilations`,
    `--codec-flag`), on the training device."""
    a = tr.args
    return Denoiser(channels=a.channels, blocks=a.blocks, dilations=a.dilations, flags=int(a.codec_flag),
                    mult=a.mult).to(tr.device)


def load_grown(net: Denoiser, state: dict[str, torch.Tensor]) -> None:
    """Load a denoiser's weights into `net`, which may have more blocks (`--blocks`), wider block
    MLPs (`--mult`) or the codec flag (`--codec-flag`): the blocks the state lacks start as
    identities (layer scale 0), the new MLP units with zero output weights (their input weights
    random, so they learn) and the flag's input weights at zero, so the grown network starts
    exactly where the smaller one ended and trains on from there."""
    own = net.state_dict()
    extra, missing = set(state) - set(own), set(own) - set(state)
    if extra or any(not k.startswith("blocks.") for k in missing):
        raise SystemExit(f"not a shallower denoiser of this one: {sorted(extra or missing)[:3]}")
    w, grown = state["inp.weight"], own["inp.weight"].shape[1]
    if w.shape[1] > grown:
        raise SystemExit("not a shallower denoiser of this one: the state has the codec flag, this one has not")
    if w.shape[1] < grown:
        state = {**state, "inp.weight": torch.cat([w, w.new_zeros(w.shape[0], grown - w.shape[1], *w.shape[2:])], 1)}
    state = {k: _widened(v, own[k], k) for k, v in state.items()}
    own.update(state)
    own.update({k: torch.zeros_like(own[k]) for k in missing if k.endswith(".scale")})
    net.load_state_dict(own)


def _widened(have: torch.Tensor, want: torch.Tensor, key: str) -> torch.Tensor:
    """A block MLP's weight or bias grown to `want`'s hidden width: trained units first, then the
    new ones -- `want`'s own random input weights and biases (pw1), zero output weights (pw2)."""
    if have.shape == want.shape:
        return have
    hidden = 1 if key.endswith("pw2.weight") else 0  # pw2 maps hidden -> channels: its axis 1
    if ".pw" not in key or have.dim() != want.dim() or have.shape[hidden] > want.shape[hidden]:
        raise SystemExit(f"not a narrower denoiser of this one: {key} {tuple(have.shape)} -> {tuple(want.shape)}")
    new = want.narrow(hidden, have.shape[hidden], want.shape[hidden] - have.shape[hidden])
    return torch.cat([have, torch.zeros_like(new) if hidden else new.to(have)], hidden)


def teacher_loss(net: Denoiser, x0: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
                 band: TargetBand, lossy: torch.Tensor | None = None) -> torch.Tensor:
    """v-prediction loss at a random time, conditioning dropped for 10 % of items (what
    classifier-free guidance needs), weighted towards the bands above the cutoff."""
    drop = (torch.rand(x0.shape[0], device=x0.device) < 0.1).float()[:, None]
    t = torch.rand(x0.shape[0], device=x0.device)
    eps = torch.randn_like(x0)
    v = net(noisy(x0, eps, t), cond * (1 - drop[:, :, None]), mask * (1 - drop), t, lossy=lossy)
    return ((v.float() - v_target(x0, eps, t)) ** 2 * band_weights(mask, band.mels)).mean()


@cache
def mel_widths() -> torch.Tensor:
    """Each mel band's effective width in STFT bins (its triangle's area over its peak): what a
    band counts for in LSD, which weighs every bin alike, where the mel scale packs many narrow
    bands under 4 kHz and few wide ones over 12 kHz."""
    return torch.from_numpy(1.0 / mel_basis().max(axis=1))


def band_level(x: torch.Tensor) -> torch.Tensor:
    """(B, mels, T) normalised log-mel -> (B, mels): each band's mean power over the frames, as a
    normalised log-mel level. A log-domain loss makes the network predict each band's mean log
    level, which for a band whose level swings (speech's top band: sibilants, then vowels) sits far
    under its mean power: in a spectrogram, and in realworld.py's edge gap, the band is too dark."""
    power_log = 2 * (x.float() * MEL_STD + MEL_MEAN)
    return ((torch.logsumexp(power_log, dim=-1) - math.log(x.shape[-1])) / 2 - MEL_MEAN) / MEL_STD


def regression_loss(net: Denoiser, x0: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
                    band: TargetBand, kind: str = "l1", lossy: torch.Tensor | None = None,
                    level: float = 0.0) -> torch.Tensor:
    """The one-pass regression network's mel error (input zeroed, t = 0), band-weighted like the
    teacher's: "l1" (the median log-mel), "l2" (the mean log-mel, what minimises LSD's squared log
    error where the high band may be either content or near-silence) or "lsd": LSD's own shape on
    the mel -- each band weighted by its width in bins, the root of each frame's mean, the mean
    over frames -- so wide top bands and quiet frames count as they do in the score. level > 0
    adds that weight times the squared error of each band's mean power over the window
    (`band_level`), band-weighted alike."""
    r = net(torch.zeros_like(x0), cond, mask, torch.zeros(len(x0), device=x0.device), lossy=lossy)
    d = r.float() - x0
    w = band_weights(mask, band.mels)
    extra = level * ((band_level(r) - band_level(x0)).square() * w[..., 0]).mean() if level else 0.0
    if kind == "lsd":
        w = w * mel_widths().to(d.device)[None, :, None]
        per_frame = (d.square() * w).sum(1) / w.sum(1).clamp_min(1e-6)
        return (per_frame + LSD_EPS).sqrt().mean() + extra
    return (d.abs() ** {"l1": 1, "l2": 2}[kind] * w).mean() + extra


def cosine_decay(done: float, floor: float) -> float:
    """Learning-rate factor at this fraction of a stage's budget: 1 falling to `floor` on a half cosine."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))


def clipped_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params) -> None:
    """One optimiser step with the gradient norm clipped at 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def teacher_rate(step: int, done: float) -> float:
    """A teacher's learning-rate factor (joint stage, cached `teacher` stage): a 200-step warm-up,
    then a half cosine to 5 % over the stage's budget (`done`: the fraction spent)."""
    return min(1.0, (step + 1) / 200) * cosine_decay(done, 0.05)


def teacher_ema_decay(step: int) -> float:
    """A teacher's EMA decay: 0.99 over its first 1,000 steps, while it moves fast, then 0.999."""
    return 0.999 if step > 1000 else 0.99


def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def aligned(hr_mel: torch.Tensor, lr_mel: torch.Tensor):
    """Target frames and the conditioning LOOKAHEAD frames ahead of them."""
    return hr_mel[..., :hr_mel.shape[-1] - LOOKAHEAD], lr_mel[..., LOOKAHEAD:]


def train_joint(tr: Trainer, pool: AudioPool, val: AudioPool) -> None:
    """Teacher denoiser, vocoder and the same-size regression baseline, on the same batches."""
    a = tr.args
    nets = {"teacher": new_denoiser(tr), "vocoder": Vocoder().to(tr.device), "regression": new_denoiser(tr)}
    ema = copy.deepcopy(nets["teacher"]).requires_grad_(False)
    if a.skip_vocoder:
        nets["vocoder"].requires_grad_(False)
    params = [p for n in nets.values() for p in n.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    step, spent = 0, 0.0
    ck = tr.load("joint")
    if ck and ck.get("config", nets["teacher"].config) != nets["teacher"].config:
        raise SystemExit(f"{tr.out}/joint.pt was trained as {ck['config']}, not {nets['teacher'].config}")
    if ck:
        for k, n in nets.items():
            n.load_state_dict(ck[k])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, spent = ck["step"], ck["spent"]
        log.info("resumed joint at step %d (%.0f s)", step, spent)
    elif a.init_slim:
        slim = torch.load(a.init_slim / "nets_basic.pt", map_location=tr.device)
        for k, n in nets.items():
            n.load_state_dict({p: v.float() for p, v in slim[f"joint.{'ema' if k == 'teacher' else k}"].items()})
        ema.load_state_dict(nets["teacher"].state_dict())
        step = int(slim.get("joint.step", 0))
        log.info("started joint from %s (step %d)", a.init_slim, step)
    elif a.init_model:
        shipped = load_model(str(a.init_model), tr.device)
        for k, n in nets.items():
            n.load_state_dict((shipped.vocoder if k == "vocoder" else shipped.denoiser).state_dict())
        ema.load_state_dict(nets["teacher"].state_dict())
        log.info("started joint from shipped model %s (its denoiser for teacher and regression)", a.init_model)
    t0, last_ck = time.time() - spent, time.time()

    def checkpoint() -> dict:
        return {**{k: n.state_dict() for k, n in nets.items()}, "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step, "spent": time.time() - t0, "config": nets["teacher"].config}

    while time.time() - t0 < a.budget_s:
        for g in opt.param_groups:
            g["lr"] = a.lr * teacher_rate(step, (time.time() - t0) / a.budget_s)
        hr, hr_spec, hr_mel, lr_mel, mask, band, lossy = tr.batch(pool, a.batch)
        x0, cond = aligned(hr_mel, lr_mel)
        with tr.autocast():
            l_teacher = teacher_loss(nets["teacher"], x0, cond, mask, band)
            l_reg = regression_loss(nets["regression"], x0, cond, mask, band, a.reg_loss, lossy)
            l_voc = torch.zeros(()) if a.skip_vocoder else vocoder_loss(nets["vocoder"], hr_mel, hr_spec, hr, band.hz)
        clipped_step(opt, l_teacher + l_reg + l_voc, params)
        ema_update(ema, nets["teacher"], teacher_ema_decay(step))
        step += 1
        if step % a.log_every == 0:
            log.info("joint step %d %.0fs teacher %.4f reg %.4f voc %.4f", step, time.time() - t0,
                     l_teacher.item(), l_reg.item(), l_voc.item())
        if time.time() - last_ck > a.ckpt_s:
            last_ck = time.time()
            tr.save("joint", checkpoint())
    tr.save("joint", checkpoint())
    log.info("joint done: %d steps; val %s", step, json.dumps(evaluate(tr, val, ema, nets["regression"])))


@torch.no_grad()
def evaluate(tr: Trainer, val: AudioPool, teacher: Denoiser, regression: Denoiser | None = None,
             students: dict[int, Denoiser] | None = None, guidance: float = 1.0, batches: int = 4) -> dict:
    """Mean |error| of the log-mel above the cutoff and inside the target's band (normalised log-mel
    units) on fixed validation crops."""
    gen_state = val.gen.get_state()
    val.gen.manual_seed(1234)
    res: dict[str, list[float]] = {}
    for _ in range(batches):
        _, _, hr_mel, lr_mel, mask, band, _ = tr.batch(val, 16)
        x0, cond = aligned(hr_mel, lr_mel)
        above = ((1 - mask) * band.mels)[:, :, None].expand_as(x0)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).to(x0.device)

        def err(pred, x0=x0, above=above):
            return float(((pred - x0).abs() * above).sum() / above.sum())
        with tr.autocast():
            res.setdefault("sinc_like", []).append(err(torch.where(above > 0, cond[:, :, :1] * 0 - 2.5, cond)))
            res.setdefault(f"teacher{TEACHER_STEPS}", []).append(
                err(sample(teacher, noise, cond, mask, TEACHER_STEPS, guidance).float()))
            if regression is not None:
                res.setdefault("regression", []).append(
                    err(regression(torch.zeros_like(x0), cond, mask, torch.zeros(len(x0), device=x0.device)).float()))
            for k, s in (students or {}).items():
                res.setdefault(f"student{k}", []).append(err(sample(s, noise, cond, mask, k).float()))
    val.gen.set_state(gen_state)
    return {k: round(float(np.mean(v)), 4) for k, v in res.items()}


def distill_phase(tr: Trainer, draw: Draw, teacher: Denoiser, student: Denoiser, steps: int,
                  guidance: float, budget_s: float) -> int:
    """One progressive-distillation phase: `student` learns 2 teacher steps (of 2*steps) in one."""
    a = tr.args
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr * 0.5, weight_decay=0.0)
    t0, n = time.time(), 0
    while time.time() - t0 < budget_s:
        hr_mel, lr_mel, mask, band, lossy = draw()
        x0, cond = aligned(hr_mel, lr_mel)
        k = torch.randint(0, steps, (x0.shape[0],), device=x0.device)
        t = 1.0 - k.float() / steps
        t_mid, t_end = t - 0.5 / steps, t - 1.0 / steps
        z = noisy(x0, torch.randn_like(x0), t)
        with torch.no_grad(), tr.autocast():
            z_mid = ddim_update(z, guided_v(teacher, z, cond, mask, t, guidance, lossy=lossy), t, t_mid)
            z_end = ddim_update(z_mid, guided_v(teacher, z_mid, cond, mask, t_mid, guidance, lossy=lossy), t_mid,
                                t_end)
            target = distill_target(z, z_end, t, t_end)
        with tr.autocast():
            v = student(z, cond, mask, t, lossy=lossy)
        loss = ((v.float() - target) ** 2 * band_weights(mask, band.mels)).mean()
        clipped_step(opt, loss, student.parameters())
        n += 1
        if n % a.log_every == 0:
            log.info("distill %d steps: it %d loss %.4f", steps, n, loss.item())
    return n


def train_distill(tr: Trainer, draw: Draw, val: AudioPool | None, tag: str = "") -> None:
    """Bake the guidance scale in at the first phase, then halve the steps down to 1, saving each
    student. `--guidance auto` picks the scale whose 32-step teacher has the lowest validation
    error; that is not the scale that distils best (runs/cpu2: auto chose 1.0 and its 1-step student
    scored 0.394 val / 0.559 dev LSD-to-sinc, against 0.347 / 0.535 for 1.5), hence the default.
    The teacher is the joint stage's EMA, or the `teacher` stage's (cached features, `--cache`),
    or with a tag that tag's; without `val` (cached features) nothing is evaluated here."""
    joint = tr.load("joint") if not tag else None
    teacher = new_denoiser(tr)
    teacher.load_state_dict((joint or tr.load(f"teacher{tag}"))["ema"])
    teacher.requires_grad_(False)
    if tr.args.guidance == "auto" and val is not None:
        scores = {g: evaluate(tr, val, teacher, guidance=g)[f"teacher{TEACHER_STEPS}"] for g in (1.0, 1.5, 2.5)}
        guidance = min(scores, key=scores.get)
        log.info("guidance scores %s -> %.1f", scores, guidance)
    else:
        guidance = float(tr.args.guidance)
    phases = [TEACHER_STEPS // 2 ** i for i in range(1, int(math.log2(TEACHER_STEPS)) + 1)]
    per_phase = tr.args.budget_s / len(phases)
    current, g = teacher, guidance
    students = {}
    for steps in phases:
        prev = tr.load(f"student{tag}{steps}")
        student = copy.deepcopy(current).requires_grad_(True)
        if prev:
            student.load_state_dict(prev["net"])
        else:
            n = distill_phase(tr, draw, current, student, steps, g, per_phase)
            tr.save(f"student{tag}{steps}", {"net": student.state_dict(), "iters": n, "guidance": guidance})
        student.requires_grad_(False)
        students[steps] = student
        current, g = student, 1.0  # guidance is baked in after the first phase
    if val is not None:
        log.info("distill%s done: val %s", tag, json.dumps(evaluate(tr, val, teacher, None,
                                                                   {k: students[k] for k in (4, 2, 1)}, guidance)))


def train_speech_teacher(tr: Trainer, pool: AudioPool) -> None:
    """Fine-tune the basic teacher on speech alone (the `speech` model's teacher)."""
    a = tr.args
    if tr.load("teacher_speech"):
        return
    net = new_denoiser(tr)
    net.load_state_dict(tr.load("joint")["ema"])
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr * 0.3, weight_decay=1e-4)
    t0, n = time.time(), 0
    while time.time() - t0 < a.budget_s:
        _, _, hr_mel, lr_mel, mask, band, _ = tr.batch(pool, a.batch)
        x0, cond = aligned(hr_mel, lr_mel)
        with tr.autocast():
            loss = teacher_loss(net, x0, cond, mask, band)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, net, 0.995)
        n += 1
        if n % a.log_every == 0:
            log.info("speech teacher it %d loss %.4f", n, loss.item())
    tr.save("teacher_speech", {"ema": ema.state_dict(), "iters": n})


def train_regression(tr: Trainer, pool: AudioPool | None, name: str, draw: Draw | None = None,
                     validate: Callable[[Denoiser], float] | None = None) -> None:
    """Go on training the joint stage's regression network alone (no teacher: about half a joint
    step's cost) on the pool's kinds — all of them ("regression") or speech alone
    ("regression_speech", a one-pass `speech` model) — with the same band-aware loss; resumes from
    its own checkpoint. `--reg-schedule cosine` decays the learning rate to zero over the stage's
    budget (wall time, counted across resumes), to settle a run trained at a constant rate.
    `draw` replaces the pool's batches (cached features: `cached_regression`); `validate`, if
    given, scores the network at each checkpoint (logged and kept in it)."""
    a = tr.args
    draw = draw or (lambda: tr.batch(pool, a.batch)[2:])
    net = new_denoiser(tr)
    ck = tr.load(name)
    if ck:
        load_grown(net, ck["net"])
    elif a.init_model:  # a shipped one-pass model's network, e.g. to grow the codec flag onto it
        load_grown(net, load_model(str(a.init_model), tr.device).denoiser.state_dict())
    elif (joint := tr.load("joint")) is not None:
        load_grown(net, joint["regression"])
    else:
        log.info("%s: no checkpoint, joint stage or --init-model: a new network", name)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr * 0.3, weight_decay=1e-4)
    if ck and "opt" in ck:
        opt.load_state_dict(ck["opt"])

    def checkpoint(n: int, spent: float) -> dict:
        ck = {"net": net.state_dict(), "opt": opt.state_dict(), "iters": n, "spent": spent,
              "loss": a.reg_loss, "config": net.config}
        if validate:
            ck["val"] = validate(net)
            log.info("%s it %d val %.4f", name, n, ck["val"])
        return ck

    def step(n: int, done: float) -> torch.Tensor:
        if a.reg_schedule == "cosine":
            for g in opt.param_groups:
                g["lr"] = a.lr * 0.3 * cosine_decay(done, 0.0)
        hr_mel, lr_mel, mask, band, lossy = draw()
        x0, cond = aligned(hr_mel, lr_mel)
        with tr.autocast():
            loss = regression_loss(net, x0, cond, mask, band, a.reg_loss, lossy, a.level_loss)
        clipped_step(opt, loss, net.parameters())
        return loss

    run_budget(tr, name, step, checkpoint, opt, ck)


def train_teacher(tr: Trainer, draw: Draw) -> None:
    """The diffusion teacher alone on cached feature pairs: the joint stage's v-prediction teacher
    and its EMA, without the vocoder and the regression beside it (the cache holds mels only),
    started from `--init-model`'s denoiser (a regression network: its t = 0 path is the teacher's
    last step) or resumed from its own checkpoint; `distill` then takes its EMA."""
    a = tr.args
    net = new_denoiser(tr)
    ck = tr.load("teacher")
    if ck:
        net.load_state_dict(ck["net"])
    elif a.init_model:
        load_grown(net, load_model(str(a.init_model), tr.device).denoiser.state_dict())
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    if ck:
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])

    def checkpoint(n: int, spent: float) -> dict:
        return {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "iters": n,
                "spent": spent, "config": net.config}

    def step(n: int, done: float) -> torch.Tensor:
        for g in opt.param_groups:
            g["lr"] = a.lr * teacher_rate(n, done)
        hr_mel, lr_mel, mask, band, lossy = draw()
        x0, cond = aligned(hr_mel, lr_mel)
        with tr.autocast():
            loss = teacher_loss(net, x0, cond, mask, band, lossy)
        clipped_step(opt, loss, net.parameters())
        ema_update(ema, net, teacher_ema_decay(n))
        return loss

    run_budget(tr, "teacher", step, checkpoint, opt, ck)


def run_budget(tr: Trainer, name: str, step: Callable[[int, float], torch.Tensor],
               checkpoint: Callable[[int, float], dict], opt: torch.optim.Optimizer, ck: dict | None) -> None:
    """A stage's loop: `step(iteration, share of the budget spent)` until its wall-time budget
    (`--budget-s`, counted across resumes from the checkpoint `ck`) is spent, a log line every
    `--log-every` iterations, `checkpoint(iterations, seconds spent)` saved as `name` every
    `--ckpt-s` seconds and at the end: a stage killed at any moment resumes from its last save."""
    a = tr.args
    t0, n, last_ck = time.time() - (ck or {}).get("spent", 0.0), (ck or {}).get("iters", 0), time.time()
    while time.time() - t0 < a.budget_s:
        loss = step(n, (time.time() - t0) / a.budget_s)
        n += 1
        if n % a.log_every == 0:
            log.info("%s it %d loss %.4f lr %.2e", name, n, loss.item(), opt.param_groups[0]["lr"])
        if time.time() - last_ck > a.ckpt_s:
            last_ck = time.time()
            tr.save(name, checkpoint(n, time.time() - t0))
    tr.save(name, checkpoint(n, time.time() - t0))


def cached_stages(tr: Trainer, a: argparse.Namespace) -> None:
    """Stages from cached feature pairs (rtsr.training.featcache): no corpus in memory and no
    degradation per step. `regression` is validated at each checkpoint on the cache's val split
    (the mean regression loss over fixed windows, simulated degradations); `teacher` and `distill`
    make a few-step generative model of the same network (`--guidance` a number here)."""
    from rtsr.training.featcache import CachedPairs  # it builds on this module's features

    stages = a.stages.split(",")
    if set(stages) - {"regression", "teacher", "distill"}:
        raise SystemExit("--cache trains the stages regression, teacher and distill")
    if "distill" in stages and a.guidance == "auto":
        raise SystemExit("--cache: give --guidance a number (auto needs audio to evaluate the teacher)")
    pairs = CachedPairs(a.cache, "train", tr.device, a.seed)  # loaded once for every stage

    def draw():
        return pairs.draw(a.batch, a.frames, a.codec_share, a.gain_drop)

    for stage, budget in zip(stages, a.budgets.split(","), strict=True):
        a.budget_s = float(budget)
        resumed = (tr.load(stage) or {}).get("iters", 0)  # a resumed stage draws batches it has not drawn
        pairs.gen.manual_seed(a.seed + resumed)
        if stage == "regression":
            cached_regression(tr, a, draw)
        elif stage == "teacher":
            train_teacher(tr, draw)
        else:
            train_distill(tr, draw, None)
        if a.slim_dir:
            write_slim(a.out, a.slim_dir)


def cached_regression(tr: Trainer, a: argparse.Namespace, draw: Draw) -> None:
    """The regression stage on cached pairs, validated on the cache's val split."""
    from rtsr.training.featcache import CachedPairs

    val = CachedPairs(a.cache, "val", tr.device, 1234)
    val_batches = [val.draw(a.batch, a.frames) for _ in range(min(max(len(val.clean) // a.batch, 1), VAL_BATCHES))]

    @torch.no_grad()
    def validate(net: Denoiser) -> float:
        losses = [regression_loss(net, *aligned(hr, lr), mask, band, a.reg_loss, lossy, a.level_loss).item()
                  for hr, lr, mask, band, lossy in val_batches]
        return round(float(np.mean(losses)), 5)

    train_regression(tr, None, "regression", draw, validate)


def write_slim(run: Path, dest: Path) -> None:
    """fp16 weights only, grouped in a few files (a lease returns at most 8 files of 16 MiB)."""
    dest.mkdir(parents=True, exist_ok=True)
    groups = {"nets_basic": {"joint": ("ema", "vocoder", "regression")},
              "teacher": {"teacher": ("ema",)},  # the cached-feature teacher stage's
              "students_basic": {f"student{k}": ("net",) for k in (4, 2, 1)},
              "students_speech": {f"student_speech{k}": ("net",) for k in (4, 2, 1)},
              "regression_speech": {"regression_speech": ("net",)},
              "regression": {"regression": ("net",)}}
    for name, files in groups.items():
        slim = {}
        for f, keys in files.items():
            p = run / f"{f}.pt"
            if p.exists():
                ck = torch.load(p, map_location="cpu")
                slim.update({f"{f}.{k}": {n: v.half() for n, v in ck[k].items()} for k in keys})
                slim.update({f"{f}.{k}": ck[k] for k in ("guidance", "iters", "step", "config", "loss")
                             if k in ck})
        if slim:
            torch.save(slim, dest / f"{name}.pt")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="folder with manifest.jsonl and FLACs")
    source.add_argument("--cache", type=Path,
                        help="train the regression stage from cached feature pairs (rtsr.training.featcache)")
    p.add_argument("--gain-drop", type=float, default=6.0,
                   help="with --cache: lower each pair by a random 0..this many dB (the cache's pairs vary)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stages", default="joint",
                   help="comma list of joint, distill, speech, speech-regression, regression")
    p.add_argument("--budgets", default="3600", help="wall seconds per stage, comma list")
    p.add_argument("--slim-dir", type=Path, help="also write small fp16 weight files here per stage")
    p.add_argument("--init-slim", type=Path, help="start the joint stage from these slim weights")
    p.add_argument("--init-model", type=Path,
                   help="start the joint stage, or a regression stage without a checkpoint, from a shipped "
                        "model folder or name")
    p.add_argument("--skip-vocoder", action="store_true", help="joint stage: keep the vocoder as it is")
    p.add_argument("--guidance", default="1.5",
                   help="classifier-free guidance baked into the students, or 'auto' (see train_distill)")
    p.add_argument("--ckpt-s", type=float, default=300.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bank", type=int, default=2048)
    p.add_argument("--high-share", type=float, default=0.0,
                   help="share of the degradation bank given to edges at 12-19.8 kHz (codec cliffs, resamplers "
                        "to 24-40 kHz): users' 16 kHz-band MP3s and Vorbis files (default 0: the usual mix)")
    p.add_argument("--codec-share", type=float, default=0.0,
                   help="share of each batch taken from real MP3/Vorbis encodes at the band the runtime "
                        "detector finds in them (codec holes below the edge; default 0: simulated only)")
    p.add_argument("--codec-flag", action="store_true",
                   help="tell the one-pass regression network which items are codec-decoded (one more input; "
                        "see models/nets.py; the sampler's networks get 0, as at run time)")
    p.add_argument("--codec-pairs", type=int, default=2000, help="how many codec pairs to make (once, at start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks", type=int, default=8, help="the denoiser's ConvNeXt blocks (its depth)")
    p.add_argument("--channels", type=int, default=160, help="the denoiser's width (a new width trains from scratch)")
    p.add_argument("--mult", type=int, default=3,
                   help="the denoiser's block MLP width over --channels (grows from a narrower one as it was)")
    p.add_argument("--dilations", default="1,2,4,8", type=lambda v: tuple(int(d) for d in v.split(",")),
                   help="the denoiser's dilation cycle over its blocks (sets its receptive field)")
    p.add_argument("--tilt", type=float, default=0.0,
                   help="random spectral tilt of the training audio, up to +-this many dB/octave above 1 kHz")
    p.add_argument("--reg-loss", choices=("l1", "l2", "lsd"), default="l1",
                   help="the regression network's mel error: l1 (median), l2 (mean log-mel) or lsd "
                        "(LSD's shape: bands weighted by width, root of each frame's mean)")
    p.add_argument("--reg-schedule", choices=("constant", "cosine"), default="constant",
                   help="the regression stage's learning rate: constant, or cosine-decayed over its budget")
    p.add_argument("--level-loss", type=float, default=0.0,
                   help="regression: weight of each band's mean-power error over the window (band_level)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--val-split", default="val", help="manifest split used for validation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (measured on 2 shared cores: 1 thread 0.55 s a step of the 12-block "
                        "denoiser, 2 threads 2.0 s)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(a.out / "train.log")])
    torch.manual_seed(a.seed)
    if a.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        log.info("device %s", torch.cuda.get_device_name())
    if a.cache:
        a.bank = 0  # degradations are in the cache
    tr = Trainer(a)
    if a.cache:
        cached_stages(tr, a)
        return
    pool = AudioPool(a.data, "train", MIX, tr.device, a.seed)
    val = AudioPool(a.data, a.val_split, MIX, tr.device, a.seed + 1)
    speech = AudioPool(a.data, "train", {"speech": 1.0}, tr.device, a.seed + 2)
    speech_val = AudioPool(a.data, a.val_split, {"speech": 1.0}, tr.device, a.seed + 3)
    if a.codec_share > 0:
        tr.add_codec_pairs(pool)
    for stage, budget in zip(a.stages.split(","), a.budgets.split(","), strict=True):
        a.budget_s = float(budget)
        if stage == "joint":
            train_joint(tr, pool, val)
        elif stage == "distill":
            train_distill(tr, lambda: tr.batch(pool, a.batch)[2:], val)
        elif stage == "speech-regression":
            train_regression(tr, speech, "regression_speech")
        elif stage == "regression":
            train_regression(tr, pool, "regression")
        elif stage == "speech":
            train_speech_teacher(tr, speech)
            train_distill(tr, lambda: tr.batch(speech, a.batch)[2:], speech_val, tag="_speech")
        else:
            raise SystemExit(f"unknown stage {stage}")
        if a.slim_dir:
            write_slim(a.out, a.slim_dir)


if __name__ == "__main__":
    main()
