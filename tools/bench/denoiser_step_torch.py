#!/usr/bin/env python3
"""Times one ControlNet denoiser step in diffusers, on CPU, for comparison with the Rust crate.

A step is what StableDiffusionControlNetPipeline does per timestep with classifier-free
guidance: ControlNet forward, then UNet forward with its residuals. SD 1.5-sized models with
random init (nothing downloaded), batch 2, latent 32x32 (hint 256x256), float32.
Prints one JSON line at the end.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import time

import torch

import diffusers
from diffusers import ControlNetModel, UNet2DConditionModel

# The real SD 1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)

BATCH, LATENT, TEXT_LEN = 2, 32, 77


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    controlnet = ControlNetModel.from_unet(unet).eval()  # default hint channels (16, 32, 96, 256)

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    states = torch.randn(BATCH, TEXT_LEN, SD15_UNET["cross_attention_dim"], generator=g)
    hint = torch.rand(BATCH, 3, 8 * LATENT, 8 * LATENT, generator=g)
    t = torch.tensor(500.0)  # the pipeline passes one scalar timestep for the CFG batch

    def step():
        # As in StableDiffusionControlNetPipeline.__call__ (conditioning_scale 1, no guess mode).
        down, mid = controlnet(
            latents,
            t,
            encoder_hidden_states=states,
            controlnet_cond=hint,
            conditioning_scale=1.0,
            guess_mode=False,
            return_dict=False,
        )
        return unet(
            latents,
            t,
            encoder_hidden_states=states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    times = []
    with torch.no_grad():
        for _ in range(args.warmup):
            step()
        for _ in range(args.iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)

    print(
        json.dumps(
            {
                "impl": "diffusers",
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "threads": torch.get_num_threads(),
                "step_seconds_median": statistics.median(times),
                "step_seconds_min": min(times),
                "iters": args.iters,
            }
        )
    )


if __name__ == "__main__":
    main()
