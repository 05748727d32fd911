#!/usr/bin/env python3
"""End-to-end parity fixtures: a tiny SD 1.5-shaped pipeline folder and what diffusers'
StableDiffusionControlNetPipeline makes with it.

Writes, under crates/diffusion/tests/fixtures/:
  pipeline_sd15/        a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/,
                        tokenizer/, scheduler/): the UNet is unet_sd15 (make_fixtures.py), the
                        text encoder a tiny CLIP over a small vocabulary made of the first merges
                        of the real CLIP BPE, the VAE a tiny 4-level one (8x, like SD's)
  controlnet_sd15_b/    a second ControlNet for the same UNet
  pipeline_hint_a.png, pipeline_hint_b.png   the two hint images (96x64)
  pipeline_cases.safetensors                 initial latents and diffusers' images per scheduler

Run make_fixtures.py first (this reuses its unet_sd15 and controlnet_sd15), then:
    HF_HUB_OFFLINE=1 python tools/parity/make_pipeline_fixtures.py
"""

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import safetensors.torch
import torch
from PIL import Image

import diffusers
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402  (the shared weight conventions)
    FIXTURES,
    HINT_CHANNELS,
    perturb_f16_exact,
    save_diffusers_f16,
)

OUTPUTS = [
    "pipeline_sd15",
    "controlnet_sd15_b",
    "pipeline_hint_a.png",
    "pipeline_hint_b.png",
    "pipeline_cases.safetensors",
]
MAX_BYTES = 1_100_000  # what this script adds, not counting the UNet copy git stores once

HEIGHT, WIDTH = 64, 96  # latent 8x12, as the other fixtures
N_MERGES = 400  # of the real CLIP BPE: a 914-token vocabulary
PROMPT = "a red cube on a wooden table, studio light"
NEGATIVE = "blurry, low quality"
STEPS = 8
GUIDANCE = 7.5
SCALES = [1.0, 0.6]
STARTS = [0.0, 0.25]
ENDS = [1.0, 0.75]

# Stable Diffusion 1.5's scheduler/scheduler_config.json.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)


def bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_small_clip_vocab(directory: Path) -> CLIPTokenizer:
    """vocab.json + merges.txt as HF lays CLIP's out, with only the first N_MERGES merges."""
    # open_clip ships CLIP's BPE; find the file without importing the package (which wants
    # torchvision).
    import importlib.util

    package = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    bpe = Path(package) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 1 + N_MERGES]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "_src"
    tmp.mkdir(exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(directory)
    # Real SD 1.x folders ship vocab.json + merges.txt (older transformers); keep those, not the
    # tokenizer.json transformers 5 writes, so the loader is tested on what users have.
    (directory / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.move(tmp / name, directory / name)
    shutil.rmtree(tmp)
    return CLIPTokenizer.from_pretrained(directory)


def hint_image(seed: int) -> Image.Image:
    """A blocky random hint: structure at the scale the hint encoder sees."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(3, HEIGHT // 8, WIDTH // 8, generator=g)
    big = small.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name in OUTPUTS:
        path = FIXTURES / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    folder = FIXTURES / "pipeline_sd15"

    unet = UNet2DConditionModel.from_pretrained(FIXTURES / "unet_sd15").float().eval()
    unet.save_pretrained(folder / "unet", safe_serialization=True)  # f16 as stored: same bytes
    shutil.copy(
        FIXTURES / "unet_sd15" / "diffusion_pytorch_model.safetensors",
        folder / "unet" / "diffusion_pytorch_model.safetensors",
    )
    controlnet_a = ControlNetModel.from_pretrained(FIXTURES / "controlnet_sd15").float().eval()

    torch.manual_seed(3001)
    controlnet_b = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    perturb_f16_exact(controlnet_b, 3002)
    save_diffusers_f16(controlnet_b, FIXTURES / "controlnet_sd15_b")
    controlnet_b.eval()

    tokenizer = write_small_clip_vocab(folder / "tokenizer")
    torch.manual_seed(3003)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    perturb_f16_exact(text_encoder, 3004)
    text_encoder.half().save_pretrained(folder / "text_encoder", safe_serialization=True)
    text_encoder.float().eval()

    torch.manual_seed(3005)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=HEIGHT,
    )
    perturb_f16_exact(vae, 3006)
    vae.half().save_pretrained(folder / "vae", safe_serialization=True)
    vae.float().eval()

    # Written as SD 1.5 ships it (with keys PNDM itself ignores, such as clip_sample).
    (folder / "scheduler").mkdir()
    scheduler_config = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD15_SCHEDULER}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionControlNetPipeline",
                "_diffusers_version": diffusers.__version__,
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
        + "\n"
    )

    hints = [hint_image(4001), hint_image(4002)]
    hints[0].save(FIXTURES / "pipeline_hint_a.png")
    hints[1].save(FIXTURES / "pipeline_hint_b.png")
    latents = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(4003))
    cases = {"latents": latents}

    base = PNDMScheduler.load_config(folder / "scheduler")
    for name, scheduler in [
        ("ddim", DDIMScheduler.from_config(base)),
        ("unipc", UniPCMultistepScheduler.from_config(base)),
    ]:
        pipe = StableDiffusionControlNetPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            controlnet=[controlnet_a, controlnet_b],
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)

        def run(**overrides):
            args = dict(
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                image=hints,
                height=HEIGHT,
                width=WIDTH,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                controlnet_conditioning_scale=SCALES,
                control_guidance_start=STARTS,
                control_guidance_end=ENDS,
                latents=latents.clone(),
                output_type="np",
            )
            args.update(overrides)
            with torch.no_grad():
                return pipe(**args).images

        out = run()
        image = torch.from_numpy(out[0]).float()  # [H, W, 3] in 0..1
        # The final latents too: far more sensitive than 8-bit images through a tiny VAE.
        cases[f"{name}.latents"] = run(output_type="latent").float().contiguous()
        # The images must depend on the controls, or the test could not fail on them.
        plain = run(
            controlnet_conditioning_scale=[0.0, 0.0],
            control_guidance_start=0.0,
            control_guidance_end=1.0,
        )
        diff = float(np.abs(plain[0] - out[0]).max())
        print(f"{name}: max |controlled - uncontrolled| = {diff:.3f}")
        assert diff > 0.05, "the controls barely change the image"
        cases[f"{name}.image"] = image.contiguous()

    settings = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=HEIGHT,
        width=WIDTH,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        controlnet_conditioning_scale=SCALES,
        control_guidance_start=STARTS,
        control_guidance_end=ENDS,
        diffusers=diffusers.__version__,
        torch=torch.__version__,
    )
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in cases.items()},
        FIXTURES / "pipeline_cases.safetensors",
        metadata={"settings": json.dumps(settings)},
    )

    added = 0
    for name in OUTPUTS:
        path = FIXTURES / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            if f.name == "diffusion_pytorch_model.safetensors" and f.parent.name == "unet":
                continue  # the same bytes as unet_sd15's: one blob in git
            added += f.stat().st_size
    print(f"added fixture bytes: {added:,d}")
    if added > MAX_BYTES:
        sys.exit(f"pipeline fixtures exceed {MAX_BYTES:,d} bytes")


if __name__ == "__main__":
    main()
