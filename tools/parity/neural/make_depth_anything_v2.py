"""Fixtures for crates/neural-annotators/tests/depth_anything_v2.rs: Depth Anything V2 as A1111's
sd-webui-controlnet (`annotator/depth_anything_v2.py`, preprocessor `depth_anything_v2`) runs it,
with the network of transformers 5.24 (`DepthAnythingForDepthEstimation`) on formula weights.

The weights are generated under the ORIGINAL checkpoint's key names (`pretrained.blocks.0.attn.qkv
.weight`, `depth_head.scratch.refinenet4.out_conv.bias`, ... as in `depth_anything_v2_vits.pth`),
which is what the Rust side reads, and converted here to transformers' names (qkv split into
q/k/v, refinenet{4-j} -> fusion_stage.layers.{j}, ...).

One deliberate change to transformers: its `Dinov2Embeddings.interpolate_pos_encoding` resizes the
37x37 position grid with `size=(h/14, w/14)`, whereas the original DINOv2 code that A1111 runs
(Depth-Anything-V2's `dinov2.py`) uses `scale_factor=((h/14 + 0.1)/37, (w/14 + 0.1)/37)`, which
samples the grid at slightly different points. The script replaces that one method with the
original's rule (below, `original_interpolate_pos_encoding`); manifest.json records how far the
unpatched transformers output is from it.

A1111's steps (`DepthAnythingV2Detector.__call__`, colored=False as its preprocessor table says):
  1. `cv2.cvtColor(image, COLOR_BGR2RGB) / 255.0` on A1111's RGB image: the network sees B, G, R;
  2. `Resize(518, 518, keep_aspect_ratio, ensure_multiple_of=14, lower_bound, INTER_CUBIC)` on
     the float64 image; ImageNet mean/std (float64); CHW float32;
  3. network -> depth (1, H', W'); `F.interpolate(depth[None], (h, w), bilinear,
     align_corners=False)`; `(d - min) / (max - min) * 255.0` (float32); `.astype(uint8)`.

Written to crates/neural-annotators/tests/fixtures/depth_anything_v2/:
  <case>.safetensors   float32: `input` (1, 3, H', W') network input from step 2 with the case's
                       lower bound instead of 518; `depth` (1, H', W') network output (ViT-S);
                       `pos_embed` (1, 1 + gh*gw, 384) the interpolated position embeddings;
                       `feature.{0..3}` the four normed intermediate token maps (1, gh*gw, 384);
                       `logits` (1, H', W') the head's last conv before its ReLU (on formula
                       weights `depth` is mostly 0, so the network is compared on `logits`)
  <case>_<map>_<w>x<h>.png  step 3 on `depth` or on `logits` (a map with a rich range, for the
                       post-processing test) to (w, h) (grey)
  pos_embed.safetensors     `pos_<H>x<W>`: the first 8 channels of ViT-S's patch position
                            embeddings as interpolated for an H x W input, (H//14 * W//14, 8)
  e2e_photo.png             the whole A1111 call (steps 1-3 at lower bound 518) on the 128x128 photo
  manifest.json             sizes, the 518 size table, statistics

Run from the repository root:
  HF_HUB_OFFLINE=1 /work/pyenv/bin/python tools/parity/neural/make_depth_anything_v2.py
"""
import json
import math
import os
import sys

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formula  # noqa: E402

from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config  # noqa: E402
from transformers.models.dinov2 import modeling_dinov2  # noqa: E402

OUT = os.path.join("crates", "neural-annotators", "tests", "fixtures", "depth_anything_v2")
INPUTS = os.path.join("crates", "annotators", "tests", "fixtures")
BUDGET = 1000 * 1024

# The three released sizes (Depth-Anything-V2 `model_configs`; A1111 uses vitl).
CONFIGS = {
    "vits": dict(embed=384, depth=12, heads=6, features=64, out=[48, 96, 192, 384], layers=[2, 5, 8, 11]),
    "vitb": dict(embed=768, depth=12, heads=12, features=128, out=[96, 192, 384, 768], layers=[2, 5, 8, 11]),
    "vitl": dict(embed=1024, depth=24, heads=16, features=256, out=[256, 512, 1024, 1024], layers=[4, 11, 17, 23]),
}
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


# ------------------------------------------------------------------------------------------------
# Weights: original names -> transformers names
# ------------------------------------------------------------------------------------------------

def original_shapes(c):
    """Every tensor of the original `DepthAnythingV2` state_dict (use_bn=False, use_clstoken=False)."""
    d, f, oc = c["embed"], c["features"], c["out"]
    s = {
        "pretrained.cls_token": (1, 1, d),
        "pretrained.pos_embed": (1, 37 * 37 + 1, d),
        "pretrained.mask_token": (1, d),
        "pretrained.patch_embed.proj.weight": (d, 3, 14, 14),
        "pretrained.patch_embed.proj.bias": (d,),
        "pretrained.norm.weight": (d,),
        "pretrained.norm.bias": (d,),
    }
    for i in range(c["depth"]):
        p = f"pretrained.blocks.{i}."
        s.update({
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "ls1.gamma": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
            p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,),
            p + "ls2.gamma": (d,),
        })
    h = "depth_head."
    for i, o in enumerate(oc):
        s[h + f"projects.{i}.weight"] = (o, d, 1, 1)
        s[h + f"projects.{i}.bias"] = (o,)
    s[h + "resize_layers.0.weight"] = (oc[0], oc[0], 4, 4)
    s[h + "resize_layers.0.bias"] = (oc[0],)
    s[h + "resize_layers.1.weight"] = (oc[1], oc[1], 2, 2)
    s[h + "resize_layers.1.bias"] = (oc[1],)
    s[h + "resize_layers.3.weight"] = (oc[3], oc[3], 3, 3)
    s[h + "resize_layers.3.bias"] = (oc[3],)
    for i, o in enumerate(oc):
        s[h + f"scratch.layer{i + 1}_rn.weight"] = (f, o, 3, 3)
    for r in range(1, 5):
        p = h + f"scratch.refinenet{r}."
        s[p + "out_conv.weight"] = (f, f, 1, 1)
        s[p + "out_conv.bias"] = (f,)
        for u in (1, 2):
            for k in (1, 2):
                s[p + f"resConfUnit{u}.conv{k}.weight"] = (f, f, 3, 3)
                s[p + f"resConfUnit{u}.conv{k}.bias"] = (f,)
    s[h + "scratch.output_conv1.weight"] = (f // 2, f, 3, 3)
    s[h + "scratch.output_conv1.bias"] = (f // 2,)
    s[h + "scratch.output_conv2.0.weight"] = (32, f // 2, 3, 3)
    s[h + "scratch.output_conv2.0.bias"] = (32,)
    s[h + "scratch.output_conv2.2.weight"] = (1, 32, 1, 1)
    s[h + "scratch.output_conv2.2.bias"] = (1,)
    return s


def original_formula_state(c):
    return {k: torch.from_numpy(formula.values(k, shape)) for k, shape in original_shapes(c).items()}


def to_transformers(sd, c):
    d = c["embed"]
    out = {
        "backbone.embeddings.cls_token": sd["pretrained.cls_token"],
        "backbone.embeddings.mask_token": sd["pretrained.mask_token"],
        "backbone.embeddings.position_embeddings": sd["pretrained.pos_embed"],
        "backbone.embeddings.patch_embeddings.projection.weight": sd["pretrained.patch_embed.proj.weight"],
        "backbone.embeddings.patch_embeddings.projection.bias": sd["pretrained.patch_embed.proj.bias"],
        "backbone.layernorm.weight": sd["pretrained.norm.weight"],
        "backbone.layernorm.bias": sd["pretrained.norm.bias"],
    }
    for i in range(c["depth"]):
        o, t = f"pretrained.blocks.{i}.", f"backbone.encoder.layer.{i}."
        qkv_w, qkv_b = sd[o + "attn.qkv.weight"], sd[o + "attn.qkv.bias"]
        for j, n in enumerate(["q_proj", "k_proj", "v_proj"]):
            out[t + f"attention.{n}.weight"] = qkv_w[j * d:(j + 1) * d]
            out[t + f"attention.{n}.bias"] = qkv_b[j * d:(j + 1) * d]
        for a, b in [("attn.proj", "attention.o_proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
            out[t + b + ".weight"] = sd[o + a + ".weight"]
            out[t + b + ".bias"] = sd[o + a + ".bias"]
        out[t + "layer_scale1.lambda1"] = sd[o + "ls1.gamma"]
        out[t + "layer_scale2.lambda1"] = sd[o + "ls2.gamma"]
    h = "depth_head."
    for i in range(4):
        for w in ("weight", "bias"):
            out[f"neck.reassemble_stage.layers.{i}.projection.{w}"] = sd[h + f"projects.{i}.{w}"]
            if i != 2:
                out[f"neck.reassemble_stage.layers.{i}.resize.{w}"] = sd[h + f"resize_layers.{i}.{w}"]
        out[f"neck.convs.{i}.weight"] = sd[h + f"scratch.layer{i + 1}_rn.weight"]
    for j in range(4):
        o, t = h + f"scratch.refinenet{4 - j}.", f"neck.fusion_stage.layers.{j}."
        for w in ("weight", "bias"):
            out[t + f"projection.{w}"] = sd[o + f"out_conv.{w}"]
            for u in (1, 2):
                for k in (1, 2):
                    out[t + f"residual_layer{u}.convolution{k}.{w}"] = sd[o + f"resConfUnit{u}.conv{k}.{w}"]
    for a, b in [("output_conv1", "conv1"), ("output_conv2.0", "conv2"), ("output_conv2.2", "conv3")]:
        for w in ("weight", "bias"):
            out[f"head.{b}.{w}"] = sd[h + f"scratch.{a}.{w}"]
    return out


def build(name):
    c = CONFIGS[name]
    backbone = Dinov2Config(
        image_size=518, patch_size=14, hidden_size=c["embed"], num_hidden_layers=c["depth"],
        num_attention_heads=c["heads"], mlp_ratio=4, layerscale_value=1.0, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False, apply_layernorm=True,
        reshape_hidden_states=False, out_indices=[i + 1 for i in c["layers"]],
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, patch_size=14, reassemble_hidden_size=c["embed"],
        reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=c["out"], fusion_hidden_size=c["features"],
        head_hidden_size=32, head_in_index=-1, depth_estimation_type="relative",
    )
    config._attn_implementation = "eager"
    model = DepthAnythingForDepthEstimation(config).eval()
    sd = to_transformers(original_formula_state(c), c)
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return model


# ------------------------------------------------------------------------------------------------
# The original DINOv2 position-embedding interpolation (Depth-Anything-V2 dinov2.py), our wording
# ------------------------------------------------------------------------------------------------

def original_grid(pos, height, width):
    """Patch position embeddings (1, N, D) of a sqrt(N) square grid resampled for an input of
    height x width pixels (grid gh x gw = height // 14 x width // 14) the way the original does it:
    `scale_factor = ((g + 0.1) / sqrt(N))` per axis, bicubic (A = -0.75), no antialias,
    align_corners False; unchanged when gh * gw == N and the input is square (in pixels)."""
    n, dim = pos.shape[1], pos.shape[2]
    side = math.sqrt(n)
    gh, gw = height // 14, width // 14
    if gh * gw == n and height == width:
        return pos
    grid = pos.float().reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic",
                         antialias=False)
    assert grid.shape[-2:] == (gh, gw), grid.shape
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim)


def original_interpolate_pos_encoding(self, embeddings, height, width):
    cls_pos = self.position_embeddings[:, :1]
    patch_pos = self.position_embeddings[:, 1:]
    grid = original_grid(patch_pos, height, width)
    return torch.cat((cls_pos, grid.to(cls_pos.dtype)), dim=1)


TRANSFORMERS_INTERPOLATE = modeling_dinov2.Dinov2Embeddings.interpolate_pos_encoding


def use_original_interpolation(on):
    modeling_dinov2.Dinov2Embeddings.interpolate_pos_encoding = (
        original_interpolate_pos_encoding if on else TRANSFORMERS_INTERPOLATE)


# ------------------------------------------------------------------------------------------------
# A1111's pre- and post-processing
# ------------------------------------------------------------------------------------------------

def target_size(w, h, lower_bound):
    """depth_anything_v2.util.transform.Resize(lower_bound, lower_bound, keep_aspect_ratio=True,
    ensure_multiple_of=14, resize_method='lower_bound').get_size, in our words: one scale for both
    axes (the larger of lower_bound/h and lower_bound/w), each side rounded (half to even) to a
    multiple of 14, rounded up instead when that falls below lower_bound."""
    sh, sw = lower_bound / h, lower_bound / w
    s = sw if sw > sh else sh

    def fit(x):
        y = int(np.round(x / 14) * 14)
        if y < lower_bound:
            y = int(np.ceil(x / 14) * 14)
        return y

    return fit(s * w), fit(s * h)


def network_input(image_rgb, lower_bound):
    """Steps 1-2 for a uint8 RGB image (A1111 hands the preprocessor RGB)."""
    x = cv2.cvtColor(image_rgb, cv2.COLOR_BGR2RGB) / 255.0
    w, h = target_size(x.shape[1], x.shape[0], lower_bound)
    x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
    x = (x - MEAN) / STD
    x = np.ascontiguousarray(np.transpose(x, (2, 0, 1))).astype(np.float32)
    return torch.from_numpy(x)[None]


def hint_from_depth(depth, w, h):
    """Step 3: depth (1, H', W') float32 -> uint8 (h, w)."""
    d = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    d = (d - d.min()) / (d.max() - d.min()) * 255.0
    return d.cpu().numpy().astype(np.uint8)


def a1111(model, image_rgb):
    h, w = image_rgb.shape[:2]
    with torch.no_grad():
        depth = model(network_input(image_rgb, 518)).predicted_depth
    return hint_from_depth(depth, w, h)


# ------------------------------------------------------------------------------------------------

def load(file):
    return np.array(Image.open(os.path.join(INPUTS, file)).convert("RGB"))


def main():
    torch.set_num_threads(2)
    cv2.setNumThreads(1)
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    use_original_interpolation(True)
    model = build("vits")
    features = {}
    model.backbone.register_forward_hook(lambda m, i, o: features.update(maps=o.feature_maps))
    model.head.conv3.register_forward_hook(lambda m, i, o: features.update(logits=o))
    manifest = {"cases": [], "pos_grids": [], "sizes_518": []}

    # (case, image, lower bound, hint sizes (w, h))
    cases = [
        ("photo_70", "in_photo_96x128.png", 70, [(128, 96), (98, 70), (37, 50)]),
        ("shapes_42", "in_shapes_64x80.png", 42, [(80, 64), (31, 23)]),
    ]
    for case, file, lb, hint_sizes in cases:
        img = load(file)
        x = network_input(img, lb)
        with torch.no_grad():
            depth = model(x).predicted_depth
            gh, gw = x.shape[2] // 14, x.shape[3] // 14
            pos = model.backbone.embeddings.interpolate_pos_encoding(
                torch.zeros(1, 1 + gh * gw, 384), x.shape[2], x.shape[3])
            use_original_interpolation(False)
            depth_hf = model(x).predicted_depth
            use_original_interpolation(True)
        with torch.no_grad():
            model(x)
        logits = features["logits"][:, 0]
        assert torch.equal(logits.relu(), depth)
        tensors = {"input": x.contiguous(), "depth": depth.contiguous(), "logits": logits.contiguous(),
                   "pos_embed": pos.contiguous()}
        for i, fm in enumerate(features["maps"]):
            tensors[f"feature.{i}"] = fm[:, 1:].contiguous()
        save_file(tensors, os.path.join(OUT, f"{case}.safetensors"))
        hints = []
        for src, m in [("depth", depth), ("logits", logits)]:
            for w, h in hint_sizes:
                g = hint_from_depth(m, w, h)
                Image.fromarray(g).save(os.path.join(OUT, f"{case}_{src}_{w}x{h}.png"))
                hints.append({"map": src, "width": w, "height": h, "mean": float(g.mean()),
                              "distinct": int(len(np.unique(g)))})
        rel = float((depth_hf - depth).abs().max() / depth.abs().max())
        manifest["cases"].append({
            "case": case, "image": file, "lower_bound": lb, "input": list(x.shape),
            "depth_max": float(depth.max()), "depth_zero": int((depth == 0).sum()),
            "depth_size": int(depth.numel()),
            "unpatched_transformers_rel_diff": rel, "hints": hints,
        })

    # Position-embedding grids (first 8 channels), including the unchanged 37x37 one.
    pos = model.backbone.embeddings.position_embeddings[:, 1:].detach()
    grids = {}
    for ph, pw in [(70, 98), (42, 56), (56, 56), (14, 14), (518, 518), (518, 504), (518, 686),
                   (686, 518), (560, 560), (518, 531)]:
        g = original_grid(pos, ph, pw)[0, :, :8].contiguous()
        grids[f"pos_{ph}x{pw}"] = g
        manifest["pos_grids"].append([ph, pw])
    save_file(grids, os.path.join(OUT, "pos_embed.safetensors"))

    # The 518 size table on a spread of detect sizes.
    for w, h in [(512, 512), (512, 768), (768, 512), (640, 360), (96, 128), (128, 96), (1000, 37),
                 (518, 518), (517, 519), (1024, 1024), (700, 525), (525, 700), (513, 900), (2048, 1)]:
        nw, nh = target_size(w, h, 518)
        manifest["sizes_518"].append([w, h, nw, nh])

    # End to end: a photo as A1111 would get it at its detect size. A square one: its 518x518
    # network input is the cheapest real-size input (1369 tokens), and takes the branch that
    # keeps the trained 37x37 position grid.
    img = load("in_photo_128x128.png")
    e2e = a1111(model, img)
    Image.fromarray(e2e).save(os.path.join(OUT, "e2e_photo.png"))
    manifest["e2e"] = {"image": "in_photo_128x128.png", "input": list(network_input(img, 518).shape),
                       "mean": float(e2e.mean()), "distinct": int(len(np.unique(e2e)))}

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(json.dumps(manifest, indent=1))
    print(f"{total} bytes in {OUT}")
    assert total <= BUDGET, total


if __name__ == "__main__":
    main()
