"""The model behind the engine: few-step sampler -> mel low-band replacement -> vocoder.

The engine only needs `bank` (every stream's state, rtsr.bank) and `run_slots()` (`run` on some
streams' slots); which networks and how many steps sit behind them is the model's business (a
distilled student, the teacher with guidance, or a test-sized random network of the same
architecture). Weights load from safetensors only, after their sha256 is checked against the
config, so a corrupted or swapped file is refused before use.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file

import rtsr.models
from rtsr.bank import ModelState, Slot, StateBank
from rtsr.features import HOP, N_FFT, N_MELS, SR, mel_centers
from rtsr.models.diffusion import prepare, sample
from rtsr.models.nets import Denoiser, Vocoder, init_cache, polar_parts

BUNDLED = Path(rtsr.models.__file__).resolve().parent  # the shipped weights live beside the code
KNOWN_MODELS = ("basic", "speech")
WEIGHTS = "weights.safetensors"
FORMAT = 1  # the layout of config.json and the weights' names
FEATURES = {"sr": SR, "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS}  # what the networks were trained on


class ModelError(RuntimeError):
    """A model that cannot be used: missing, untrained, corrupted or incompatible."""


class SuperResModel:
    def __init__(self, denoiser: Denoiser, vocoder: Vocoder, steps: int, guidance: float = 1.0,
                 lookahead: int = 1, name: str = "custom", device: str = "cpu", info: dict | None = None,
                 temperature: float = 1.0):
        """temperature scales the sampler's starting noise: 1 samples the learned distribution,
        0 starts every frame from the prior's mean, a deterministic estimate (lower LSD)."""
        self.denoiser = denoiser.to(device).eval().requires_grad_(False)
        self.vocoder = vocoder.to(device).eval().requires_grad_(False)
        self.steps, self.guidance, self.lookahead = steps, guidance, lookahead
        self.temperature = temperature
        self.name, self.device, self.info = name, device, info or {}
        self._bank: StateBank | None = None
        self._bank_made = threading.Lock()
        # mel band centres on the device once, not uploaded from numpy every hop
        self._centers = torch.from_numpy(mel_centers()).to(device)
        prepare(self.denoiser, steps)

    @property
    def bank(self) -> StateBank:
        """Every stream's streaming state (rtsr.bank), made when the first stream joins (once:
        streams made on several threads at once had each made a bank, and all but the last shared
        its rows with others)."""
        with self._bank_made:
            if self._bank is None:
                self._bank = StateBank(self.new_state)
            return self._bank

    @classmethod
    def random(cls, channels: int = 32, blocks: int = 2, steps: int = 2, seed: int = 0,
               device: str = "cpu") -> SuperResModel:
        """Untrained, tiny, same architecture: for engine tests, never for users."""
        torch.manual_seed(seed)
        return cls(Denoiser(channels, blocks, emb_dim=32), Vocoder(channels, blocks), steps,
                   name="random-test", device=device)

    @classmethod
    def from_dir(cls, path: str | Path, device: str = "cpu", steps: int | None = None) -> SuperResModel:
        path = Path(path)
        cfg_path, w_path = path / "config.json", path / WEIGHTS
        if not cfg_path.exists() or not w_path.exists():
            raise ModelError(f"no trained model installed at {path} (needs config.json and {WEIGHTS})")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") != FORMAT or cfg.get("features") != FEATURES:
            raise ModelError(f"{cfg_path} describes format {cfg.get('format')} with features {cfg.get('features')}; "
                             f"this engine runs format {FORMAT} with {FEATURES}: install a model made for it")
        digest = hashlib.sha256(w_path.read_bytes()).hexdigest()
        if digest != cfg.get("sha256"):
            raise ModelError(f"{w_path} does not match the sha256 in its config.json: the file is "
                             "corrupted or was replaced; reinstall the model")
        try:
            tensors = load_file(str(w_path))
        except Exception as e:  # safetensors raises several types for a damaged header
            raise ModelError(f"cannot read {w_path}: {e}") from e
        den, voc = Denoiser(**cfg["denoiser"]), Vocoder(**cfg["vocoder"])
        for prefix, net in (("denoiser.", den), ("vocoder.", voc)):
            net.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
        counts = step_counts(cfg)
        if steps is not None and steps not in counts:
            name = cfg.get("name", path.name)
            if counts == [0]:
                raise ModelError(f"{name} is a one-pass regression network: it has no sampler steps to set")
            raise ModelError(f"{name} was distilled for {_listed(counts)} sampler step(s), not {steps}: a "
                             "distilled student is undefined at other counts (it drifts louder)")
        return cls(den, voc, cfg["steps"] if steps is None else steps, cfg.get("guidance", 1.0), cfg["lookahead"],
                   cfg.get("name", path.name), device, cfg, cfg.get("temperature", 1.0))

    def new_state(self, batch: int, lossy: bool = False) -> ModelState:
        """Zeroed caches for `batch` channels: one per sampler step (the regression variant,
        steps == 0, uses one); guidance runs a conditional and an unconditional branch. lossy:
        the stream is decoded from a lossy codec (MP3, Vorbis, Opus)."""
        branches = 2 if self.steps and self.guidance != 1.0 else 1
        return ModelState(steps=[init_cache(self.denoiser, batch * branches, self.device)
                                 for _ in range(max(self.steps, 1))],
                          vocoder=init_cache(self.vocoder, batch, self.device),
                          lossy=torch.full((batch,), float(lossy), device=self.device))

    def run_slots(self, slots: list[Slot] | slice, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """`run` for the streams that own these slots of `bank`, their rows in this order (cutoff
        (B, T), one row per channel), or for a slice of the bank's rows (streams whose slots follow
        each other): one call for all, their state updated in place in the bank, and only if the
        call succeeds. A backend that runs the bank's rows where they lie (`run_bank`: a CUDA
        graph over them, rtsr.graphs) is given the bank instead of their gathered state."""
        run_bank = getattr(self.run, "run_bank", None)
        if run_bank is not None:
            return run_bank(self.bank, slots, cond, low, cutoff, noise)
        with self.bank.state_of(slots) as state:
            return self.run(state, cond, low, cutoff, noise)

    @torch.inference_mode()
    def run(self, state: ModelState, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
            noise: torch.Tensor) -> torch.Tensor:
        """Frames -> complex spectra.

        cond: (B, mels, T) LR log-mel `lookahead` frames ahead of the output frames; low: the LR
        log-mel of the output frames themselves; cutoff: (T,) or (B, T) Hz per frame; noise:
        (B, mels, T). Returns (B, T, bins) complex, on the CPU: that copy is the hop's one host
        sync (`hop` itself makes none).
        """
        dev = self.device
        re, im = self.hop(state, cond.to(dev), low.to(dev), cutoff.to(dev), noise.to(dev))
        return torch.complex(re, im).cpu()

    def hop(self, state: ModelState, cond: torch.Tensor, low: torch.Tensor, cutoff: torch.Tensor,
            noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`run`'s computation proper, on the model's device, in real arithmetic: the sampler (or
        the regression), the mel low-band replacement and the vocoder, returning the spectra's
        real and imaginary parts. The ONNX backend exports exactly this, whole.

        Below the cutoff the vocoder is given the input's mel, lifted to the model's own estimate
        where it lies under it. Why: a lossy codec zeroes whole bands below its edge (LAME's
        scale-factor bands, granule by granule), so the input's mel had holes there, the vocoder
        rendered them, and the engine's hole fill (`rtsr.engine.merge_low_band`) had nothing to
        take. Where the input is whole the merge keeps its spectrum anyway; only the vocoder's
        view of the band changes (measured with `basic`: no dev-set cell worse)."""
        centers = self._centers
        cutoff = cutoff.expand(cond.shape[0], -1)[:, None, :]  # (B, 1, T)
        mask = (centers[None, :, None] < cutoff).float()
        if self.steps:
            mel = sample(self.denoiser, noise * self.temperature, cond, mask, self.steps, self.guidance, state.steps,
                         state.lossy)
        else:  # steps == 0: the one-step regression baseline predicts the mel directly
            mel = self.denoiser(torch.zeros_like(cond), cond, mask, None, state.steps[0], lossy=state.lossy,
                                film=self.denoiser.step_film(0.0))
        keep = (centers[None, :, None] < 0.88 * cutoff).float()
        mel = keep * torch.maximum(low, mel) + (1 - keep) * mel
        return polar_parts(self.vocoder(mel, state.vocoder))


def step_counts(cfg: dict) -> list[int]:
    """The sampler step counts a model's weights were made for: a distilled student's own count
    (its config's `steps`), a teacher's every count up to its training grid (`step_counts`)."""
    return list(cfg.get("step_counts", [cfg["steps"]]))


def _listed(counts: list[int]) -> str:
    return ", ".join(map(str, counts)) if len(counts) < 6 else f"{counts[0]}-{counts[-1]}"


def bundled_path(name: str) -> Path:
    return BUNDLED / name


def load_model(name_or_path: str, device: str = "cpu", steps: int | None = None) -> SuperResModel:
    """A bundled model by name ("basic", "speech") or a model directory."""
    p = Path(name_or_path)
    if not p.is_dir():
        if name_or_path not in KNOWN_MODELS and not bundled_path(name_or_path).is_dir():
            raise ModelError(f"unknown model {name_or_path!r}; bundled: {', '.join(KNOWN_MODELS)}")
        p = bundled_path(name_or_path)
    return SuperResModel.from_dir(p, device, steps)

