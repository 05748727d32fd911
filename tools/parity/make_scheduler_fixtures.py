#!/usr/bin/env python3
"""Writes the scheduler parity fixtures for crates/diffusion/tests/schedulers.rs.

For every case: diffusers' timesteps, sigmas and init_noise_sigma, then a whole denoising loop
driven by fixed random "model outputs" (no model: the schedulers are what is tested), with every
step's scaled model input and prev_sample, plus `add_noise` at a mid index. The noise the
stochastic schedulers draw (DDIM with eta > 0, Euler ancestral) comes from a saved stream that
is handed to diffusers explicitly, so the Rust test can hand the same noise to ours.

Run from the repository root: `python tools/parity/make_scheduler_fixtures.py`
(versions: tools/parity/requirements.txt). Writes only
crates/diffusion/tests/fixtures/schedulers.{safetensors,json}.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import sys
from pathlib import Path

import numpy
import safetensors
import safetensors.torch
import torch

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "crates" / "diffusion" / "tests" / "fixtures"
MAX_BYTES = 300_000

# Stable Diffusion 1.5's scheduler/scheduler_config.json, as shipped (a PNDM config without
# `timestep_spacing` / `prediction_type`: every scheduler built from it uses its own defaults
# for those, as diffusers' `from_config` does).
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# Batch of two, non-square: small enough that whole 25-step loops of ~25 cases fit the budget
# (scheduler math is elementwise, so the spatial size does not matter).
SHAPE = (2, 4, 3, 4)
MAX_STEPS = 25

CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "dpmpp-2m-karras": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}

# name, kind, steps, fields added to the SD 1.5 config JSON, eta, img2img start index.
CASES = [
    ("ddim_10", "ddim", 10, {}, 0.0, 0),
    ("ddim_25", "ddim", 25, {}, 0.0, 0),
    ("ddim_eta0.5_10", "ddim", 10, {}, 0.5, 0),
    ("ddim_v_10", "ddim", 10, {"prediction_type": "v_prediction"}, 0.0, 0),
    ("ddim_trailing_10", "ddim", 10, {"timestep_spacing": "trailing"}, 0.0, 0),
    # 7 linspace steps hit numpy's round-half-to-even (166.5 -> 166, 499.5 -> 500), and DDIM's
    # prev_timestep = t - 1000 // 7 is not the next timestep of that schedule.
    ("ddim_linspace_7", "ddim", 7, {"timestep_spacing": "linspace"}, 0.0, 0),
    ("ddim_img2img_10", "ddim", 10, {}, 0.0, 4),
    ("euler_10", "euler", 10, {}, 0.0, 0),
    ("euler_25", "euler", 25, {}, 0.0, 0),
    ("euler_v_10", "euler", 10, {"prediction_type": "v_prediction"}, 0.0, 0),
    ("euler_leading_10", "euler", 10, {"timestep_spacing": "leading"}, 0.0, 0),
    ("euler_trailing_7", "euler", 7, {"timestep_spacing": "trailing"}, 0.0, 0),
    ("euler_img2img_10", "euler", 10, {}, 0.0, 3),
    # Fields PNDM does not know travel in the config too (diffusers keeps them for other classes).
    ("euler_karras_10", "euler", 10, {"use_karras_sigmas": True}, 0.0, 0),
    ("euler-a_10", "euler-a", 10, {}, 0.0, 0),
    ("euler-a_25", "euler-a", 25, {}, 0.0, 0),
    ("euler-a_v_leading_10", "euler-a", 10, {"prediction_type": "v_prediction", "timestep_spacing": "leading"}, 0.0, 0),
    ("dpmpp-2m_10", "dpmpp-2m", 10, {}, 0.0, 0),
    ("dpmpp-2m_25", "dpmpp-2m", 25, {}, 0.0, 0),
    ("dpmpp-2m_v_10", "dpmpp-2m", 10, {"prediction_type": "v_prediction"}, 0.0, 0),
    ("dpmpp-2m_leading_10", "dpmpp-2m", 10, {"timestep_spacing": "leading"}, 0.0, 0),
    ("dpmpp-2m_img2img_10", "dpmpp-2m", 10, {}, 0.0, 4),
    ("dpmpp-2m_heun_10", "dpmpp-2m", 10, {"solver_type": "heun"}, 0.0, 0),
    ("dpmpp-2m-karras_10", "dpmpp-2m-karras", 10, {}, 0.0, 0),
    ("dpmpp-2m-karras_25", "dpmpp-2m-karras", 25, {}, 0.0, 0),
    ("unipc_10", "unipc", 10, {}, 0.0, 0),
    ("unipc_25", "unipc", 25, {}, 0.0, 0),
    ("unipc_v_trailing_10", "unipc", 10, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.0, 0),
    ("unipc_img2img_10", "unipc", 10, {}, 0.0, 3),
    ("unipc_karras_10", "unipc", 10, {"use_karras_sigmas": True}, 0.0, 0),
]

SEEDS = {"sample": 1, "model_outputs": 2, "step_noise": 3, "original": 4, "add_noise": 5}


def randn(name, shape):
    g = torch.Generator().manual_seed(SEEDS[name])
    return torch.randn(shape, generator=g, dtype=torch.float32)


def build(kind, fields, steps):
    # As a user of diffusers does: the pipeline's scheduler config, then `Class.from_config`.
    base = PNDMScheduler.from_config({**SD15, **fields})
    extra = {}
    if kind.startswith("dpmpp-2m"):
        extra = dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=kind.endswith("karras"))
    scheduler = CLASSES[kind].from_config(base.config, **extra)
    for k, v in fields.items():  # the fields did reach the scheduler
        if k in scheduler.config and k not in extra:
            assert scheduler.config[k] == v, (k, scheduler.config[k], v)
    scheduler.set_timesteps(steps)
    assert scheduler.order == 1
    return scheduler


class NoiseStream:
    """Hands out the saved step noise in order, like a seeded generator would."""

    def __init__(self, noise):
        self.noise = noise
        self.used = 0

    def next(self, shape, dtype):
        assert tuple(shape) == SHAPE and dtype == torch.float32, (shape, dtype)
        n = self.noise[self.used]
        self.used += 1
        return n.clone()


def run_case(name, kind, steps, fields, eta, start, shared):
    s = build(kind, fields, steps)
    ts = s.timesteps
    assert len(ts) == steps and len(set(ts.tolist())) == steps, ts
    out = {f"{name}.timesteps": ts.to(torch.float32)}
    # Timesteps must survive the trip through float32 unchanged (integers, or f32 already).
    assert torch.equal(out[f"{name}.timesteps"].to(ts.dtype), ts)
    if hasattr(s, "sigmas") and kind != "ddim":
        out[f"{name}.sigmas"] = s.sigmas.to(torch.float32)
    init_noise_sigma = s.init_noise_sigma
    out[f"{name}.init_noise_sigma"] = torch.tensor([float(init_noise_sigma)], dtype=torch.float32)

    # add_noise at a mid index, on a fresh scheduler (no begin index: found by timestep).
    mid = steps // 2
    fresh = build(kind, fields, steps)
    out[f"{name}.add_noise"] = fresh.add_noise(shared["original"], shared["add_noise"], ts[mid : mid + 1])

    stream = NoiseStream(shared["step_noise"])
    if start == 0:
        sample = shared["sample"] * init_noise_sigma
    else:
        # The img2img pipelines: timesteps[t_start:], set_begin_index(t_start) where the
        # scheduler has it (DDIM does not: it is indexed by timestep), and the image latents
        # noised to timesteps[t_start].
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(start)
        sample = s.add_noise(shared["original"], shared["add_noise"], ts[start : start + 1])
        out[f"{name}.init"] = sample
    scaled, prev = [], []
    original_randn = scheduling_euler_ancestral_discrete.randn_tensor
    scheduling_euler_ancestral_discrete.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **kw: stream.next(shape, dtype)
    try:
        for i in range(start, steps):
            t = ts[i]
            x_in = s.scale_model_input(sample, t)
            if kind not in ("euler", "euler-a"):
                assert x_in is sample or torch.equal(x_in, sample)
            scaled.append(x_in)
            model_output = shared["model_outputs"][i]
            if kind == "ddim":
                noise = stream.next(SHAPE, torch.float32) if eta > 0 else None
                sample = s.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
            else:
                sample = s.step(model_output, t, sample).prev_sample
            assert sample.dtype == torch.float32
            prev.append(sample)
    finally:
        scheduling_euler_ancestral_discrete.randn_tensor = original_randn
    if kind in ("euler", "euler-a"):
        out[f"{name}.scaled"] = torch.stack(scaled)
    out[f"{name}.prev"] = torch.stack(prev)
    assert torch.isfinite(out[f"{name}.prev"]).all()
    meta = {
        "kind": kind,
        "steps": steps,
        "fields": fields,
        "eta": eta,
        "start": start,
        "noise_drawn": stream.used,
        # How diffusers resolved the fields the SD 1.5 config leaves out (the test checks ours).
        "resolved": {k: s.config[k] for k in ("timestep_spacing", "prediction_type", "steps_offset")},
    }
    return out, meta


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if diffusers.__version__ != "0.42.1":
        print(f"WARNING: diffusers {diffusers.__version__}, fixtures were specified against 0.42.1")
    shared = {
        "sample": randn("sample", SHAPE),
        "model_outputs": randn("model_outputs", (MAX_STEPS, *SHAPE)),
        "step_noise": randn("step_noise", (MAX_STEPS, *SHAPE)),
        "original": randn("original", SHAPE),
        "add_noise": randn("add_noise", SHAPE),
    }
    tensors = dict(shared)
    cases = {}
    with torch.no_grad():
        for name, kind, steps, fields, eta, start in CASES:
            out, meta = run_case(name, kind, steps, fields, eta, start, shared)
            tensors.update(out)
            cases[name] = meta
            print(f"  {name}: timesteps {[round(float(t), 3) for t in out[name + '.timesteps']]}")

    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / "schedulers.safetensors"
    safetensors.torch.save_file(tensors, path)
    manifest = {
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": numpy.__version__},
        "base_config": SD15,
        "shape": list(SHAPE),
        "cases": cases,
    }
    (FIXTURES / "schedulers.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = path.stat().st_size + (FIXTURES / "schedulers.json").stat().st_size
    print(f"{len(tensors)} tensors, {size:,d} bytes")
    if size > MAX_BYTES:
        sys.exit(f"scheduler fixtures exceed the {MAX_BYTES:,d} byte budget")


if __name__ == "__main__":
    main()
