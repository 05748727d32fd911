#!/usr/bin/env python3
"""Writes the tiny SD 1.5 pipeline folder's models as one original single-file checkpoint.

Output, under crates/diffusion/tests/fixtures/:
  pipeline_sd15_single_file.safetensors   the UNet, VAE and text encoder of pipeline_sd15/ (f16,
                                          the very values stored in the folder) in the layout of
                                          `v1-5-pruned-emaonly.safetensors`:
                                            model.diffusion_model.*        the LDM UNet names
                                            first_stage_model.*            the LDM VAE names
                                            cond_stage_model.transformer.  transformers' CLIP names

The LDM names are made here by inverting diffusers' conversion (written from the layout of the
original openaimodel.UNetModel: input_blocks / middle_block / output_blocks, ResBlock's
in_layers / emb_layers / out_layers / skip_connection). The file is then read back with
diffusers' own converters and its single-file pipeline loader, which must give exactly the
folder's state dicts; the script fails otherwise.

Run make_pipeline_fixtures.py first (this reads its pipeline_sd15/), then, from the repository
root:
    HF_HUB_OFFLINE=1 /work/pyenv/bin/python tools/parity/make_single_file_fixtures.py
"""

import os

# Nothing comes from a model hub: every config is read from the local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import re
import sys
from pathlib import Path

import safetensors.torch
import torch

import diffusers
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import FIXTURES, RESNET_INNER, assert_same_state_dict  # noqa: E402
from make_text_vae_fixtures import ldm_vae_key  # noqa: E402  (the VAE's inverse, shared)

FOLDER = FIXTURES / "pipeline_sd15"
OUTPUT = FIXTURES / "pipeline_sd15_single_file.safetensors"
MAX_BYTES = 1_500_000

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Real SD 1.x checkpoints keep transformers' pre-5.6 names, with the `text_model.` level.
CLIP_PREFIX = "cond_stage_model.transformer.text_model."


def ldm_unet_key(key: str, config: dict) -> str:
    """The LDM name (without `model.diffusion_model.`) of a diffusers UNet2DConditionModel key."""
    lpb = config["layers_per_block"]
    assert isinstance(lpb, int), "the LDM layout has one resnet count for every level"
    n_levels = len(config["block_out_channels"])

    def resnet(block: str, inner: str) -> str:
        sub, _, rest = inner.partition(".")
        return f"{block}.{RESNET_INNER[sub]}.{rest}"

    # Down path: input_blocks.0 is conv_in; level l then has lpb entries [resnet, attention?]
    # and, but for the last level, one [downsampler] entry.
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, inner = int(m[1]), m[2], int(m[3]), m[4]
        assert level < n_levels and j < lpb, key
        n = 1 + level * (lpb + 1) + j
        return resnet(f"input_blocks.{n}.0", inner) if kind == "resnets" else f"input_blocks.{n}.1.{inner}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        assert level < n_levels - 1, key
        return f"input_blocks.{(level + 1) * (lpb + 1)}.0.op.{m[2]}"
    # middle_block is [resnet, attention, resnet].
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return resnet(f"middle_block.{2 * int(m[1])}", m[2])
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    # Up path, deepest level first as in diffusers: up level b has lpb + 1 entries
    # [resnet, attention?], the last of which also ends in the upsampler (no upsampler on the
    # last level), at index 1 after a lone resnet or 2 after resnet + attention.
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, inner = int(m[1]), m[2], int(m[3]), m[4]
        assert level < n_levels and j < lpb + 1, key
        n = level * (lpb + 1) + j
        return resnet(f"output_blocks.{n}.0", inner) if kind == "resnets" else f"output_blocks.{n}.1.{inner}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        assert level < n_levels - 1, key
        has_attention = config["up_block_types"][level] == "CrossAttnUpBlock2D"
        n = level * (lpb + 1) + lpb
        return f"output_blocks.{n}.{2 if has_attention else 1}.conv.{m[2]}"
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for new, old in prefixes.items():
        if key.startswith(new):
            return old + key[len(new) :]
    raise KeyError(f"no LDM name for the UNet key {key}")


def load_folder_tensors(relative: str) -> dict:
    """A weight file of the folder as stored (f16)."""
    tensors = safetensors.torch.load_file(FOLDER / relative)
    assert all(t.dtype == torch.float16 for t in tensors.values()), relative
    return tensors


def put(out: dict, name: str, tensor: torch.Tensor) -> None:
    assert name not in out, f"two keys map to {name}"
    # clone: each tensor its own storage, as safetensors wants.
    out[name] = tensor.contiguous().clone()


def sd15_alphas_cumprod() -> torch.Tensor:
    """SD 1.5's DDPM buffer (scaled_linear betas 0.00085..0.012 over 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def to_single_file(unet_config: dict, vae_config: dict) -> dict:
    out = {}
    for key, tensor in load_folder_tensors("unet/diffusion_pytorch_model.safetensors").items():
        put(out, UNET_PREFIX + ldm_unet_key(key, unet_config), tensor)
    n_levels = len(vae_config["block_out_channels"])
    for key, tensor in load_folder_tensors("vae/diffusion_pytorch_model.safetensors").items():
        name = VAE_PREFIX + ldm_vae_key(key, n_levels)
        # The LDM VAE's attention q/k/v/proj_out are 1x1 convolutions.
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        put(out, name, tensor)
    for key, tensor in load_folder_tensors("text_encoder/model.safetensors").items():
        put(out, CLIP_PREFIX + key, tensor)
    # What else real checkpoints carry, which loaders must pass over: the text encoder's
    # position ids buffer, the DDPM schedule buffers and the EMA bookkeeping scalars.
    put(out, CLIP_PREFIX + "embeddings.position_ids", torch.arange(77)[None])
    put(out, "alphas_cumprod", sd15_alphas_cumprod())
    put(out, "model_ema.decay", torch.tensor(0.9999, dtype=torch.float32))
    put(out, "model_ema.num_updates", torch.tensor(0, dtype=torch.int32))
    return out


def verify(path: Path, unet, vae, text_encoder) -> None:
    """diffusers must read the single file back to exactly the folder's three models."""
    checkpoint = safetensors.torch.load_file(path)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert_same_state_dict(unet.state_dict(), converted, "convert_ldm_unet_checkpoint")
    converted = convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    assert_same_state_dict(vae.state_dict(), converted, "convert_ldm_vae_checkpoint")
    # As create_diffusers_clip_model_from_ldm does it for the flattened transformers 5 model.
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
    converted.pop("embeddings.position_ids")
    assert_same_state_dict(text_encoder.state_dict(), converted, "convert_ldm_clip_checkpoint")

    # The whole single-file pipeline loader, its configs taken from the local folder (so the
    # config inference, which would need the Hub, is not involved).
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(FOLDER),
        local_files_only=True,
        torch_dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )
    for name, expected in [("unet", unet), ("vae", vae), ("text_encoder", text_encoder)]:
        assert_same_state_dict(
            expected.state_dict(), getattr(pipe, name).state_dict(), f"StableDiffusionPipeline.from_single_file {name}"
        )
    print(f"  {path.name}: diffusers' converters and from_single_file give back all three folder models")


def main() -> None:
    torch.set_num_threads(1)
    if diffusers.__version__ != "0.42.1":
        print(f"WARNING: diffusers {diffusers.__version__}, fixtures were specified against 0.42.1")
    if OUTPUT.exists():
        OUTPUT.unlink()
    unet = UNet2DConditionModel.from_pretrained(FOLDER / "unet", local_files_only=True).float()
    vae = AutoencoderKL.from_pretrained(FOLDER / "vae", local_files_only=True).float()
    text_encoder = CLIPTextModel.from_pretrained(FOLDER / "text_encoder", local_files_only=True).float()

    tensors = to_single_file(dict(unet.config), dict(vae.config))
    n_unet = sum(k.startswith(UNET_PREFIX) for k in tensors)
    assert n_unet == len(unet.state_dict()), (n_unet, len(unet.state_dict()))
    safetensors.torch.save_file(tensors, OUTPUT)
    verify(OUTPUT, unet, vae, text_encoder)

    size = OUTPUT.stat().st_size
    print(f"  {size:>10,d}  {OUTPUT.relative_to(FIXTURES)}")
    if size > MAX_BYTES:
        sys.exit(f"{OUTPUT.name} exceeds {MAX_BYTES:,d} bytes")


if __name__ == "__main__":
    main()
