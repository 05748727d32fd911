#!/usr/bin/env python3
"""The diffusers side of `controlnet-serve device-check`'s benchmark, measured the same way.

SD 1.5-size models with random weights (nothing downloaded): the real SD 1.5 UNet, VAE and
CLIP ViT-L/14 text-encoder configs, a ControlNet made with ControlNetModel.from_unet, the real
CLIP tokenizer (the vocabulary this repo carries), UniPC from SD 1.5's scheduler config.

- step_seconds: one ControlNet forward + UNet forward with its residuals, batch 2 (CFG),
  latents size/8, hint size x size, timesteps [981, 981]; median of --step-iters after 2
  warm-ups, the device synchronised before each clock read.
- pipeline: StableDiffusionControlNetPipeline, size x size, --steps steps, UniPC, guidance 7.5,
  one grid hint image, per batch B a list of B prompts (negative prompt each, seed k per image),
  one image each; one warm-up run at batch 1 first. Peak device memory: a thread reads the
  device-wide used memory (total - free, torch.cuda.mem_get_info) every ~5 ms during the run
  and keeps the maximum, as ours does with cuMemGetInfo; torch.cuda.max_memory_allocated is
  reported beside it.

Prints one JSON object (the shape of device-check's "bench"); --json writes it to a file too.
--tiny uses the tiny configs of crates/diffusion/tests/fixtures/pipeline_sd15 (random weights
too) for a smoke test on a CPU.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import gzip
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffusers
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates/diffusion/tests/fixtures"
CLIP_ASSETS = ROOT / "crates/diffusion/assets/clip"

# runwayml/stable-diffusion-v1-5 unet/config.json (crates/diffusion/src/config.rs SD15_UNET_CONFIG).
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)

# vae/config.json of SD 1.5 (crates/diffusion/src/vae.rs VaeConfig::sd15).
SD15_VAE = dict(
    act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# text_encoder/config.json of SD 1.5: openai/clip-vit-large-patch14's text tower.
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# scheduler/scheduler_config.json of SD 1.5 (a PNDM config; pipelines swap in UniPC from it).
SD15_SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    clip_sample=False,
)

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def sd15_tokenizer(work: Path) -> CLIPTokenizer:
    """The SD 1.5 tokenizer folder: the fixture's configs + the full CLIP vocabulary and merges."""
    folder = work / "tokenizer"
    shutil.copytree(FIXTURES / "tokenizer_sd15", folder)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(CLIP_ASSETS / f"{name}.gz", "rb") as src, open(folder / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def read_json(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def make_models(tiny: bool, device: torch.device, dtype: torch.dtype, work: Path):
    """Random-init models, made on the device (fast there), then cast."""
    if tiny:
        pipe_dir = FIXTURES / "pipeline_sd15"
        unet_cfg = read_json(pipe_dir / "unet/config.json")
        vae_cfg = read_json(pipe_dir / "vae/config.json")
        text_cfg = CLIPTextConfig.from_pretrained(str(pipe_dir / "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(str(pipe_dir / "tokenizer"), local_files_only=True)
    else:
        unet_cfg, vae_cfg = SD15_UNET, SD15_VAE
        text_cfg = CLIPTextConfig(**SD15_TEXT)
        tokenizer = sd15_tokenizer(work)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        controlnet = ControlNetModel.from_unet(unet)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(text_cfg)
    models = [m.to(device=device, dtype=dtype).eval() for m in (unet, controlnet, vae, text_encoder)]
    scheduler = UniPCMultistepScheduler.from_config(SD15_SCHEDULER)
    return (*models, tokenizer, scheduler)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryPoller:
    """Device-wide used memory (total - free) every ~5 ms from a thread; the maximum seen."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = None
        self._stop = threading.Event()
        self._thread = None

    def _used(self):
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self):
        if self.device.type == "cuda":
            self.peak = self._used()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while True:
            used = self._used()
            self.peak = used if self.peak is None else max(self.peak, used)
            if self._stop.wait(0.005):
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            used = self._used()
            self.peak = max(self.peak, used)
        return False


def step_seconds(unet, controlnet, size, iters, device, dtype, context_dim) -> float:
    latent = size // 8
    g = torch.Generator(device="cpu").manual_seed(1)
    sample = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    states = torch.randn(2, 77, context_dim, generator=g).to(device, dtype)
    hint = torch.rand(2, 3, size, size, generator=g).to(device, dtype)
    t = torch.tensor([981.0, 981.0], device=device)

    def step():
        # As StableDiffusionControlNetPipeline.__call__ does (conditioning scale 1, no guess mode).
        down, mid = controlnet(
            sample,
            t,
            encoder_hidden_states=states,
            controlnet_cond=hint,
            conditioning_scale=1.0,
            guess_mode=False,
            return_dict=False,
        )
        unet(
            sample,
            t,
            encoder_hidden_states=states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )
        sync(device)

    times = []
    with torch.inference_mode():
        for _ in range(2):
            step()
        for _ in range(max(1, iters)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def grid_hint(size: int) -> Image.Image:
    """Edges of a grid, as a canny hint would look (device-check's hint)."""
    idx = np.arange(size)
    line = (idx % 64) < 2
    mask = line[None, :] | line[:, None]
    a = np.where(mask, 255, 0).astype(np.uint8)
    return Image.fromarray(np.stack([a, a, a], axis=-1))


def pipeline_run(pipe, batch, size, steps, hint, device) -> dict:
    prompts = [f"a photograph of a house by a lake, number {k}" for k in range(batch)]
    negatives = ["blurry, low quality"] * batch
    gen_device = "cuda" if device.type == "cuda" else "cpu"
    generators = [torch.Generator(device=gen_device).manual_seed(k) for k in range(batch)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    with MemoryPoller(device) as poller:
        start = time.perf_counter()
        out = pipe(
            prompt=prompts,
            negative_prompt=negatives,
            image=hint,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=generators,
            output_type="pil",
        )
        sync(device)
        seconds = time.perf_counter() - start
    assert len(out.images) == batch, f"{len(out.images)} images for batch {batch}"
    row = {
        "batch": batch,
        "seconds": seconds,
        "seconds_per_image": seconds / batch,
        "images_per_second": batch / seconds,
        "peak_device_memory_bytes": poller.peak,
    }
    if device.type == "cuda":
        row["torch_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="f16", choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes")
    parser.add_argument("--step-iters", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny fixture configs (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the JSON object here")
    args = parser.parse_args()
    if args.size <= 0 or args.size % 8:
        parser.error("--size: a positive multiple of 8")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        parser.error("--batches: batch sizes of at least 1")

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    result = {
        "impl": f"diffusers {diffusers.__version__} (torch {torch.__version__})",
        "model": "tiny" if args.tiny else "sd15",
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
    }
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)

    def save() -> None:
        # After every stage, so that a run killed at its timeout leaves what it measured.
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    def emit(code: int) -> int:
        save()
        print(json.dumps(result, indent=2), flush=True)
        return code

    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            unet, controlnet, vae, text_encoder, tokenizer, scheduler = make_models(
                args.tiny, device, dtype, Path(tmp)
            )
            sync(device)
            log(f"models made on {device} in {time.perf_counter() - start:.1f} s")

            context_dim = unet.config.cross_attention_dim
            result["step_seconds"] = step_seconds(
                unet, controlnet, args.size, args.step_iters, device, dtype, context_dim
            )
            log(f"step (ControlNet + UNet, batch 2): {result['step_seconds']:.4f} s")
            save()

            pipe = StableDiffusionControlNetPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                controlnet=controlnet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            hint = grid_hint(args.size)
            warm = pipeline_run(pipe, 1, args.size, args.steps, hint, device)
            log(f"warm-up, batch 1: {warm['seconds']:.2f} s")
            result["pipeline"] = []
            for b in batches:
                row = pipeline_run(pipe, b, args.size, args.steps, hint, device)
                result["pipeline"].append(row)
                save()
                peak = row["peak_device_memory_bytes"]
                log(
                    f"batch {b:>3}: {row['seconds']:8.3f} s, {row['seconds_per_image']:7.3f} s/image, "
                    f"{row['images_per_second']:7.3f} images/s, peak device memory "
                    + ("n/a" if peak is None else f"{peak / 2**30:.2f} GiB")
                )
    except Exception as e:  # noqa: BLE001 - report whatever broke, with what was measured
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
        return emit(1)
    return emit(0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
