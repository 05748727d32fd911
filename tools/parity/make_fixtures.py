#!/usr/bin/env python3
"""Writes the parity fixtures for crates/diffusion/tests (parity.rs, zero_conv.rs).

Tiny, randomly initialised diffusers models plus diffusers' own float32 outputs for them.
Run from anywhere: `python tools/parity/make_fixtures.py` (versions: tools/parity/requirements.txt).
Everything under crates/diffusion/tests/fixtures/ is deleted and rewritten.

Weights are f16-exact: the f32 references are computed with weights that are exactly
representable in f16, and the weights are stored as f16, so Rust loading them as f32 is exact.
"""

import os

# Nothing comes from a model hub: every model is built from a config dict.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import re
import shutil
import sys
from pathlib import Path

import numpy
import safetensors
import safetensors.torch
import torch
import transformers
from torch import nn

import diffusers
from diffusers import ControlNetModel, UNet2DConditionModel

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "crates" / "diffusion" / "tests" / "fixtures"
MAX_FIXTURE_BYTES = 5_000_000
# What this script writes (and alone may delete) under FIXTURES.
OUTPUTS = [
    "unet_sd15",
    "controlnet_sd15",
    "control_sd15_original.safetensors",
    "control_sd15_original.pth",
    "unet_sd21",
    "controlnet_sd21_pool",
    "cases.safetensors",
    "manifest.json",
]

# Non-square latents on purpose (catches H/W mix-ups); the hint is 8x the latent. The SD 2.x
# latent is odd, so the UNet must upsample to its skips' sizes (diffusers' `upsample_size`),
# as it must for any image whose side is a multiple of 8 but not of 8 * 2^(levels-1).
BATCH = 3
LATENT = {"sd15": (8, 12), "sd21": (7, 10)}
# Per-sample, all different: a batch may mix jobs at different denoising steps.
TIMESTEPS = [999.0, 453.5, 1.0]
TEXT_LEN = 77

# One seed per model and per input, so changing one thing does not reshuffle everything else.
SEEDS = {
    "unet_sd15.init": 1501,
    "unet_sd15.noise": 1502,
    "controlnet_sd15.init": 1503,
    "controlnet_sd15.noise": 1504,
    "unet_sd21.init": 2101,
    "unet_sd21.noise": 2102,
    "controlnet_sd21_pool.init": 2103,
    "controlnet_sd21_pool.noise": 2104,
    "sd15.sample": 15001,
    "sd15.encoder_hidden_states": 15002,
    "sd15.cond": 15003,
    "sd15.residuals": 15004,
    "sd21.sample": 21001,
    "sd21.encoder_hidden_states": 21002,
    "sd21.cond": 21003,
}

UNET_SD15 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 48),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)

UNET_SD21 = dict(
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=[2, 4],  # legacy name: a list here means number of heads per level
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)

# 4 entries like the real (16, 32, 96, 256): 3 stride-2 convs, so the hint is 8x the latent,
# and 6 inner convs, so conv_out lands at input_hint_block.14 as in the original checkpoints.
HINT_CHANNELS = (8, 8, 16, 16)


# ---------------------------------------------------------------------------------------------
# Weights


def perturb_f16_exact(model: nn.Module, seed: int) -> None:
    """Adds noise to every parameter and rounds it to f16.

    diffusers' init leaves zero convs, biases and controlnet_cond_embedding.conv_out at zero,
    which would hide mapping bugs; the noise makes every tensor matter. Norm weights go near 1
    so activations keep a sane scale.
    """
    g = torch.Generator().manual_seed(seed)
    norm_weights = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            new = 1.0 + 0.1 * noise if name in norm_weights else p + 0.02 * noise
            p.copy_(new.half().float())


def assert_f16_exact(model: nn.Module) -> None:
    for name, p in model.state_dict().items():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, p.half().float()), f"{name} is not f16-exact"


def save_diffusers_f16(model: nn.Module, directory: Path) -> None:
    """save_pretrained in f16 (exact, see above), then back to f32 for the reference runs."""
    model.half()
    model.save_pretrained(directory, safe_serialization=True)
    model.float()
    # The folder must load back, through diffusers, to exactly this model.
    reloaded = type(model).from_pretrained(directory, local_files_only=True)
    assert_same_state_dict(model.state_dict(), reloaded.state_dict(), f"reload of {directory.name}")


def assert_same_state_dict(expected: dict, actual: dict, what: str) -> None:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise SystemExit(f"{what}: missing keys {missing[:5]}..., unexpected keys {extra[:5]}...")
    for k, v in expected.items():
        w = actual[k]
        if w.is_meta or w.shape != v.shape or not torch.equal(w.float(), v.float()):
            raise SystemExit(f"{what}: tensor {k} differs")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# ControlNet: diffusers layout -> original lllyasviel / LDM single-file layout.
#
# Written from the layout of the original cldm.ControlNet (input_blocks, middle_block,
# zero_convs, input_hint_block), as the inverse of what diffusers' convert_controlnet_checkpoint
# reads; it is driven by the config, so other depths/level counts map too.

RESNET_INNER = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def original_controlnet_key(key: str, config) -> str:
    """The original-layout name (without the `control_model.` prefix) of a diffusers key."""
    lpb = config["layers_per_block"]
    n_levels = len(config["block_out_channels"])
    n_hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)

    def resnet(prefix: str, inner: str) -> str:
        sub, _, rest = inner.partition(".")
        return f"{prefix}.{RESNET_INNER[sub]}.{rest}"

    # In the original, every down-path layer (resnet(+attention) or downsampler) is one
    # input_blocks entry; entry 0 is conv_in. Level l has lpb layers and then its downsampler.
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, inner = int(m[1]), m[2], int(m[3]), m[4]
        assert level < n_levels and j < lpb, key
        block = 1 + level * (lpb + 1) + j
        return resnet(f"input_blocks.{block}.0", inner) if kind == "resnets" else f"input_blocks.{block}.1.{inner}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        assert level < n_levels - 1, key  # the last level does not downsample
        return f"input_blocks.{(level + 1) * (lpb + 1)}.0.op.{m[2]}"
    # middle_block is [resnet, attention, resnet].
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return resnet(f"middle_block.{2 * int(m[1])}", m[2])
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    # input_hint_block is a Sequential of conv, SiLU, conv, SiLU, ..., conv: convs at even indices.
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        assert int(m[1]) < n_hint_blocks, key
        return f"input_hint_block.{2 + 2 * int(m[1])}.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.+)", key):
        return f"input_hint_block.{2 + 2 * n_hint_blocks}.{m[1]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
        "controlnet_mid_block.": "middle_block_out.0.",
    }
    for new, old in prefixes.items():
        if key.startswith(new):
            return old + key[len(new):]
    raise KeyError(f"no original-layout name for {key}")


def to_original_layout(controlnet: ControlNetModel) -> dict:
    """f16 state dict in the original layout, keys prefixed `control_model.`."""
    out = {}
    for key, tensor in controlnet.state_dict().items():
        name = "control_model." + original_controlnet_key(key, controlnet.config)
        assert name not in out, f"two keys map to {name}"
        # clone: own storage per tensor (torch.save would otherwise write shared storages whole).
        out[name] = tensor.detach().half().contiguous().clone()
    return out


def verify_single_file(path: Path, config_dir: Path, expected: ControlNetModel) -> None:
    """diffusers' own loader must read the original-layout file back to exactly `expected`."""
    # `config` = a local diffusers folder (load_config reads its config.json), so nothing is
    # fetched; without it diffusers would look the checkpoint type up on the Hub.
    loaded = ControlNetModel.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
    )
    assert_same_state_dict(expected.state_dict(), loaded.state_dict(), f"from_single_file({path.name})")
    print(f"  from_single_file({path.name}, config={config_dir.name}/): state_dict identical")


# ---------------------------------------------------------------------------------------------
# Models


def build_unet(name: str, config: dict) -> UNet2DConditionModel:
    torch.manual_seed(SEEDS[f"{name}.init"])  # diffusers' init draws from the global RNG
    unet = UNet2DConditionModel(**config).eval()
    perturb_f16_exact(unet, SEEDS[f"{name}.noise"])
    return unet


def build_controlnet(name: str, unet: UNet2DConditionModel, **extra_config) -> ControlNetModel:
    torch.manual_seed(SEEDS[f"{name}.init"])
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    if extra_config:
        # from_unet takes no global_pool_conditions: rebuild with the changed config and the same
        # weights. Private keys dropped: `_use_default_values` would make diffusers discard the
        # override of a key it lists.
        public = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
        rebuilt = ControlNetModel.from_config({**public, **extra_config})
        rebuilt.load_state_dict(controlnet.state_dict())
        controlnet = rebuilt
    controlnet.eval()
    # Noise after from_unet: the encoder no longer equals the UNet's and the zero convs are not zero.
    perturb_f16_exact(controlnet, SEEDS[f"{name}.noise"])
    assert not torch.equal(controlnet.conv_in.weight, unet.conv_in.weight)
    assert controlnet.controlnet_cond_embedding.conv_out.weight.abs().min() > 0
    return controlnet


# ---------------------------------------------------------------------------------------------
# Inputs


def randn(seed_name: str, shape, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(SEEDS[seed_name]))


def inputs(family: str, cross_dim: int) -> dict:
    h, w = LATENT[family]
    return {
        "sample": randn(f"{family}.sample", (BATCH, 4, h, w)),
        "timesteps": torch.tensor(TIMESTEPS, dtype=torch.float32),
        "encoder_hidden_states": randn(f"{family}.encoder_hidden_states", (BATCH, TEXT_LEN, cross_dim)),
        "cond": torch.rand(
            (BATCH, 3, 8 * h, 8 * w), generator=torch.Generator().manual_seed(SEEDS[f"{family}.cond"])
        ),
    }


def run_controlnet(controlnet, x, scale, guess_mode=False):
    down, mid = controlnet(
        x["sample"],
        x["timesteps"],
        encoder_hidden_states=x["encoder_hidden_states"],
        controlnet_cond=x["cond"],
        conditioning_scale=scale,
        guess_mode=guess_mode,
        return_dict=False,
    )
    return list(down), mid


def run_unet(unet, x, residuals=None):
    kwargs = {}
    if residuals is not None:
        kwargs = dict(down_block_additional_residuals=residuals[0], mid_block_additional_residual=residuals[1])
    return unet(x["sample"], x["timesteps"], encoder_hidden_states=x["encoder_hidden_states"], **kwargs).sample


def put_residuals(cases: dict, prefix: str, residuals) -> None:
    down, mid = residuals
    for i, r in enumerate(down):
        cases[f"{prefix}.down.{i}"] = r
    cases[f"{prefix}.mid"] = mid


# ---------------------------------------------------------------------------------------------


def main() -> None:
    torch.use_deterministic_algorithms(True)
    # One thread: reductions run in a fixed order, so reruns on one machine are bit-identical.
    torch.set_num_threads(1)
    if diffusers.__version__ != "0.42.1":
        print(f"WARNING: diffusers {diffusers.__version__}, fixtures were specified against 0.42.1")

    # Only this script's outputs: other scripts write their own fixtures beside them.
    for name in OUTPUTS:
        path = FIXTURES / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    manifest = {
        "versions": {
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": numpy.__version__,
        },
        "models": {},
        "cases": {},
    }
    cases = {}

    def record(name, model, path, layout="diffusers"):
        manifest["models"][name] = {
            "path": path,
            "layout": layout,
            "class": type(model).__name__,
            "parameters": n_params(model),
            "tensors": len(model.state_dict()),
        }

    with torch.no_grad():
        # --- SD 1.5-shaped UNet + ControlNet ---------------------------------------------------
        print("sd15")
        unet = build_unet("unet_sd15", UNET_SD15)
        controlnet = build_controlnet("controlnet_sd15", unet)
        for name, model in [("unet_sd15", unet), ("controlnet_sd15", controlnet)]:
            assert_f16_exact(model)
            save_diffusers_f16(model, FIXTURES / name)
            record(name, model, name)

        # The same ControlNet in the original single-file layout, as .safetensors and as .pth.
        original = to_original_layout(controlnet)
        st_path = FIXTURES / "control_sd15_original.safetensors"
        pth_path = FIXTURES / "control_sd15_original.pth"
        safetensors.torch.save_file(original, st_path)
        torch.save(original, pth_path)  # plain dict of tensors, no wrapper
        for path in (st_path, pth_path):
            verify_single_file(path, FIXTURES / "controlnet_sd15", controlnet)
            record(path.name, controlnet, path.name, layout="original (control_model.*), f16")

        x = inputs("sd15", UNET_SD15["cross_attention_dim"])
        for k, v in x.items():
            cases[f"sd15.{k}"] = v
        cases["sd15.unet.out"] = run_unet(unet, x)

        scale_1 = run_controlnet(controlnet, x, 1.0)
        put_residuals(cases, "sd15.controlnet.scale_1", scale_1)
        put_residuals(cases, "sd15.controlnet.scale_0.5", run_controlnet(controlnet, x, 0.5))
        put_residuals(cases, "sd15.controlnet.guess_0.8", run_controlnet(controlnet, x, 0.8, guess_mode=True))

        # Residuals independent of any ControlNet: tests the UNet's residual path on its own.
        g = torch.Generator().manual_seed(SEEDS["sd15.residuals"])
        random_residuals = (
            [0.5 * torch.randn(r.shape, generator=g) for r in scale_1[0]],
            0.5 * torch.randn(scale_1[1].shape, generator=g),
        )
        put_residuals(cases, "sd15.residuals", random_residuals)
        cases["sd15.unet.out_with_residuals"] = run_unet(unet, x, random_residuals)
        # The pair as the pipeline runs it.
        cases["sd15.unet.out_with_controlnet"] = run_unet(unet, x, scale_1)

        # --- SD 2.x-shaped: linear projections, upcast attention, heads per level, pooling -----
        print("sd21")
        unet21 = build_unet("unet_sd21", UNET_SD21)
        pool = build_controlnet("controlnet_sd21_pool", unet21, global_pool_conditions=True)
        assert pool.config.global_pool_conditions and pool.config.use_linear_projection
        assert pool.config.upcast_attention
        for name, model in [("unet_sd21", unet21), ("controlnet_sd21_pool", pool)]:
            assert_f16_exact(model)
            save_diffusers_f16(model, FIXTURES / name)
            record(name, model, name)

        x = inputs("sd21", UNET_SD21["cross_attention_dim"])
        for k, v in x.items():
            cases[f"sd21.{k}"] = v
        cases["sd21.unet.out"] = run_unet(unet21, x)
        # Pooled: [B, C, 1, 1], saved as diffusers returns them.
        put_residuals(cases, "sd21.controlnet_pool.scale_0.7", run_controlnet(pool, x, 0.7))

    # Sanity: residuals must move the UNet (else the residual tests could not fail).
    for k in ("sd15.unet.out_with_residuals", "sd15.unet.out_with_controlnet"):
        assert not torch.allclose(cases[k], cases["sd15.unet.out"], atol=1e-3), k

    cases = {k: v.detach().float().contiguous() for k, v in cases.items()}
    safetensors.torch.save_file(cases, FIXTURES / "cases.safetensors")
    manifest["cases"] = {k: list(v.shape) for k, v in sorted(cases.items())}
    (FIXTURES / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    # --- Size budget -------------------------------------------------------------------------
    total = 0
    own = [FIXTURES / name for name in OUTPUTS]
    files = [p for p in own if p.is_file()] + [f for p in own if p.is_dir() for f in p.rglob("*")]
    for path in sorted(f for f in files if f.is_file()):
        size = path.stat().st_size
        total += size
        print(f"  {size:>10,d}  {path.relative_to(FIXTURES)}")
    print(f"total fixture size: {total:,d} bytes ({total / 2**20:.2f} MiB)")
    for name, m in manifest["models"].items():
        print(f"  {name}: {m['parameters']:,d} parameters")
    if total > MAX_FIXTURE_BYTES:
        sys.exit(f"fixtures exceed the {MAX_FIXTURE_BYTES / 2**20:.0f} MiB budget")


if __name__ == "__main__":
    main()
