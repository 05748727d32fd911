#!/usr/bin/env python3
"""Times one ControlNet denoiser step in diffusers, on CPU, for comparison with the Rust crate.

A step is what StableDiffusionControlNetPipeline does per timestep with classifier-free
guidance: ControlNet forward, then UNet forward with its residuals. SD 1.5-sized models with
random init (nothing downloaded), batch 2, latent 32x32 (hint 256x256), float32.
Prints one JSON line at the end. With --profile, first a per-operator breakdown of one step
(torch.profiler, self CPU time by operator class) on stderr.
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


def op_class(name: str, shapes) -> str:
    """The breakdown's classes: convolutions by kernel size, matmuls, attention, norms,
    element-wise, copies."""
    if name in ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d",
                "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::_nnpack_spatial_convolution"):
        weight = shapes[1] if len(shapes) > 1 else []
        k = weight[-1] if len(weight) == 4 else "?"
        return f"conv {k}x{k}"
    if name in ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear", "aten::bmm", "aten::baddbmm"):
        return "matmul (linear, attention products)"
    if "attention" in name or name in ("aten::_softmax", "aten::softmax"):
        return "attention (sdpa, softmax)"
    if "group_norm" in name:
        return "group norm"
    if "layer_norm" in name:
        return "layer norm"
    if name in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::empty", "aten::to",
                "aten::_to_copy", "aten::upsample_nearest2d", "aten::pad"):
        return "copies, cat, resize"
    if name in ("aten::silu", "aten::gelu", "aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::div",
                "aten::sub", "aten::exp", "aten::sin", "aten::cos", "aten::chunk", "aten::sigmoid"):
        return "element-wise"
    return "other"


def profile(step) -> None:
    """One step under torch.profiler: self CPU time per operator class, on stderr."""
    import sys
    from collections import defaultdict

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    totals = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        totals[op_class(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e6
    whole = sum(totals.values())
    print(f"{'operator class':<40} {'self s':>8} {'share':>7}", file=sys.stderr)
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{name:<40} {seconds:>8.3f} {seconds / whole:>7.1%}", file=sys.stderr)
    print(f"{'total':<40} {whole:>8.3f}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="per-operator breakdown on stderr")
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

    if args.profile:
        with torch.no_grad():
            profile(step)
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
