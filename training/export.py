"""Turn training checkpoints into a shipped model folder: models/<name>/{weights.safetensors,config.json}.

    python -m rtsr.training.export --slim runs/gpu/slim --name basic --student 2
    python -m rtsr.training.export --slim runs/gpu/slim --name speech --student 2 --speech
    python -m rtsr.training.export --average runs/a/m runs/b/m --name basic   # a weight average

Weights are stored as float16 safetensors (no pickle on load) and the config records their
sha256, which the loader checks before using them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rtsr.model import BUNDLED, FEATURES, FORMAT, SuperResModel, load_model
from rtsr.models.nets import Denoiser, Vocoder
from rtsr.training.train import LOOKAHEAD, load_grown

GROWN = {"flags": 0, "blocks": 8, "mult": 3}  # what load_grown can add to a denoiser, with its default


def export(denoiser: Denoiser, vocoder: Vocoder, dest: Path, name: str, steps: int, guidance: float,
           info: dict, temperature: float = 1.0, teacher_steps: int = 0) -> Path:
    """Write weights (float16) and config; the networks' own configs travel with them. A student
    (or the regression, steps 0) runs at its own step count only; a teacher (teacher_steps, its
    training grid) at any count up to it."""
    tensors = {f"denoiser.{k}": v.half().contiguous() for k, v in denoiser.state_dict().items()}
    tensors.update({f"vocoder.{k}": v.half().contiguous() for k, v in vocoder.state_dict().items()})
    dest.mkdir(parents=True, exist_ok=True)
    w = dest / "weights.safetensors"
    save_file(tensors, str(w))
    cfg = {"name": name, "format": FORMAT, "steps": steps, "guidance": guidance, "temperature": temperature,
           "step_counts": list(range(1, teacher_steps + 1)) if teacher_steps else [steps],
           "lookahead": LOOKAHEAD,
           "features": FEATURES,
           "denoiser": denoiser.config, "vocoder": vocoder.config,
           "sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "training": info}
    (dest / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return dest


def average(models: list[Path], dest: Path, name: str, info: dict, weights: list[float] | None = None) -> Path:
    """One model whose denoiser is the (weighted) mean of several exported models' denoisers
    (checkpoints of one network along its training: a weight average sits nearer the middle of the
    basin that they wander around than any one of them). Same architecture and vocoder required,
    except that a smaller network is first grown to the largest (`train.load_grown`: the codec flag,
    more blocks, wider block MLPs, all starting with the same outputs), so a grown run can be
    averaged with the model it started from."""
    loaded = [SuperResModel.from_dir(m) for m in models]
    weights = weights or [1.0] * len(loaded)
    if len(weights) != len(loaded) or min(weights) < 0 or sum(weights) <= 0:
        raise SystemExit(f"--weights: one non-negative weight per model ({len(loaded)}), not all zero")
    first = max(loaded, key=lambda m: tuple(m.denoiser.config.get(k, GROWN[k]) for k in GROWN))
    for m in loaded:
        fixed = [{k: v for k, v in n.denoiser.config.items() if k not in GROWN} for n in (m, first)]
        if fixed[0] != fixed[1] or m.steps != first.steps:
            raise SystemExit(f"{m.name}: another architecture or step count than {first.name}")
        if any(not torch.equal(a, b) for a, b in zip(m.vocoder.state_dict().values(),
                                                      first.vocoder.state_dict().values(), strict=True)):
            raise SystemExit(f"{m.name}: another vocoder than {first.name}")
    states = []
    for m in loaded:
        grown = Denoiser(**first.denoiser.config)
        load_grown(grown, m.denoiser.state_dict())
        states.append(grown.state_dict())
    mean = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / sum(weights) for k in states[0]}
    first.denoiser.load_state_dict(mean)
    info = {**info, "averaged": [m.info.get("training", {}) for m in loaded]}
    if len(set(weights)) > 1:
        info["average_weights"] = weights
    return export(first.denoiser, first.vocoder, dest, name, first.steps, first.guidance, info, first.temperature,
                  teacher_steps=0 if first.info["step_counts"] == [first.steps] else max(first.info["step_counts"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--slim", type=Path, help="folder written by train --slim-dir")
    source.add_argument("--average", type=Path, nargs="+", metavar="MODEL",
                        help="exported model folders of one network: ship the mean of their denoisers")
    p.add_argument("--weights", type=lambda t: [float(v) for v in t.split(",")],
                   help="with --average: comma list, one weight per model (default: equal)")
    p.add_argument("--name", required=True)
    p.add_argument("--student", type=int, default=2, help="sampler steps of the student to ship; 0 = teacher")
    p.add_argument("--regression", action="store_true", help="export the one-step regression baseline")
    p.add_argument("--teacher-steps", type=int, default=32)
    p.add_argument("--speech", action="store_true", help="take the speech-finetuned students (or regression)")
    p.add_argument("--continued", action="store_true",
                   help="with --regression: take the `regression` stage's network, not the joint stage's")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="scale of the sampler's starting noise (0: deterministic, the lowest LSD)")
    p.add_argument("--out", type=Path, help="destination (default models/<name>)")
    p.add_argument("--info", default="{}", help="JSON merged into the config's training record")
    p.add_argument("--vocoder-from", metavar="MODEL",
                   help="take the vocoder from this shipped model (name or folder): a `regression` stage "
                        "started with --init-model has no joint stage of its own to take it from")
    a = p.parse_args(argv)
    info = json.loads(a.info)
    if a.average:
        print(average(a.average, a.out or BUNDLED / a.name, a.name, info, a.weights))
        return
    joint, cached = a.slim / "nets_basic.pt", a.slim / "teacher.pt"
    if not joint.exists() and not a.vocoder_from:
        raise SystemExit(f"{joint} is missing: a run with no joint stage (started from a shipped model, or "
                         "on cached features) takes its vocoder from a model: --vocoder-from MODEL")
    nets = torch.load(joint, map_location="cpu") if joint.exists() else {}
    teacher = torch.load(cached, map_location="cpu") if not nets and cached.exists() else {}
    config = nets.get("joint.config") or teacher.get("teacher.config", {})  # a student is its teacher's copy
    if a.regression and a.speech:
        speech = torch.load(a.slim / "regression_speech.pt", map_location="cpu")
        den, steps, guidance = speech["regression_speech.net"], 0, 1.0
        config = speech.get("regression_speech.config", config)  # the stage may have grown the network
    elif a.regression and a.continued:
        cont = torch.load(a.slim / "regression.pt", map_location="cpu")
        den, steps, guidance = cont["regression.net"], 0, 1.0
        info.update(regression_iters=cont.get("regression.iters"), loss=cont.get("regression.loss"))
        config = cont.get("regression.config", config)  # the stage may have grown the network
    elif a.regression:
        den, steps, guidance = nets["joint.regression"], 0, 1.0
    elif a.student:
        group = "students_speech" if a.speech else "students_basic"
        key = f"student{'_speech' if a.speech else ''}{a.student}"
        studs = torch.load(a.slim / f"{group}.pt", map_location="cpu")
        den, steps, guidance = studs[f"{key}.net"], a.student, 1.0
        info.update(distill_iters_last_phase=studs.get(f"{key}.iters"), guidance_baked=studs.get(f"{key}.guidance"))
    else:
        den, steps = nets["joint.ema"] if nets else teacher["teacher.ema"], a.teacher_steps
        students = a.slim / "students_basic.pt"
        guidance = torch.load(students, map_location="cpu").get("student4.guidance", 1.0) if students.exists() else 1.0
    info["joint_steps"] = nets.get("joint.step")
    den_net, voc_net = Denoiser(**config), Vocoder()
    den_net.load_state_dict({k: v.float() for k, v in den.items()})
    vocoder = load_model(a.vocoder_from).vocoder.state_dict() if a.vocoder_from else nets["joint.vocoder"]
    voc_net.load_state_dict({k: v.float() for k, v in vocoder.items()})
    print(export(den_net, voc_net, a.out or BUNDLED / a.name, a.name, steps, guidance, info, a.temperature,
                 teacher_steps=0 if a.regression or a.student else a.teacher_steps))


if __name__ == "__main__":
    main()
