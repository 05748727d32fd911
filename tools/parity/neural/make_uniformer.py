"""Reference and fixtures for `seg_ufade20k`: UniFormer-S + UPerNet (`upernet_global_small.pth`)
as lllyasviel's ControlNet / A1111's sd-webui-controlnet run it through their vendored mmseg
(`annotator/uniformer`: `init_segmentor(config, checkpoint)`, `inference_segmentor(model, img)`,
`show_result_pyplot(model, img, result, get_palette('ade'), opacity=1)`). controlnet_aux 0.0.10
does not ship UniFormer (nor mmseg/mmcv), so, as the issue asks, the reference is written here in
torch from the architecture's description; this file is that reference, and the fixtures for
crates/neural-annotators/tests/uniformer.rs. Module and parameter names are the checkpoint's
state_dict keys (`backbone.…`, `decode_head.…`, `auxiliary_head.…`).

The reference, step by step (config `exp/upernet_global_small/config.py` over
`configs/_base_/models/upernet_uniformer.py` and `configs/_base_/datasets/ade20k.py`):
1. input: the RGB image at its detect size (the caller's `resize_image`), given to mmseg as if it
   were BGR;
2. test pipeline `MultiScaleFlipAug(img_scale=(2048, 512), flip=False)` → `Resize(keep_ratio)`:
   mmcv `imrescale`: factor `min(2048 / long side, 512 / short side)`, new size
   `int(w * f + 0.5)`, `int(h * f + 0.5)`, `cv2.resize(INTER_LINEAR)` (a copy when the size is
   unchanged);
3. `Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)`: float32,
   channels swapped (so the network sees the photo's B, G, R), `cv2.subtract` mean (float32),
   `cv2.multiply` by `1 / std` (in double, rounded to float32);
4. network: UniFormer (conv blocks in stages 1–2, global attention blocks in stages 3–4) →
   UPerHead (PPM pool scales 1, 2, 3, 6 + FPN) → `conv_seg`, logits at 1/4 of the input;
5. `test_cfg.mode == 'whole'`: logits resized (bilinear, align_corners=False) to the network
   input's size, then (`rescale=True`) to the original image's size, softmax, argmax over classes;
6. `show_result(palette=ade, opacity=1)`: `color_seg[seg == label] = palette[label]` (RGB), then
   `[..., ::-1]` (BGR), `img * 0 + color_seg * 1` → uint8; `show_result_pyplot` returns
   `bgr2rgb` of it: the hint is `palette[label]` in RGB.

Fixtures written to crates/neural-annotators/tests/fixtures/uniformer/ (formula weights,
formula.py; the Rust side regenerates the same weights):
  net_small.safetensors     config `small` (the real UniFormer-S + UPerNet), fed `x` directly
                            (a 48×72 normalized photo): `x`, `feat0..feat3` (the backbone's four
                            outputs), `logits` (decode head, 1×150×12×18)
  net_tiny.safetensors      the same (`feat3` only) for config `tiny` on a 52×68 input (odd sizes
                            all through)
  <case>_input.png          detect-size images for the `tiny` pipeline (img_scale (192, 48))
  <case>.safetensors        `logits` (head output), and for two cases `x` (the normalized,
                            rescaled network input)
  <case>_labels.png         the argmax label map (grey), at the detect size
  <case>_hint.png           the reference's hint (RGB)
  resize_<w>x<h>.png        cv2.resize(INTER_LINEAR) of in_photo_96x128.png, as mmcv imrescale
                            calls it
  palette_labels.png / palette_hint.png   every class id, coloured by the reference's step 6
  tiny_layout.pth           config `tiny`'s full state dict (with `auxiliary_head.…` and
                            `num_batches_tracked`) in the real file's layout, written by
                            torch.save as mmcv's save_checkpoint does: {'meta': {...},
                            'state_dict': OrderedDict}
  manifest.json             per case: sizes, distinct labels

Run from the repository root:  /work/pyenv/bin/python tools/parity/neural/make_uniformer.py
"""
import collections
import importlib.util
import json
import os
import sys

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formula  # noqa: E402

OUT = os.path.join("crates", "neural-annotators", "tests", "fixtures", "uniformer")
INPUTS = os.path.join("crates", "annotators", "tests", "fixtures")
BUDGET = 1100 * 1024

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float64)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float64)


class Config:
    def __init__(self, embed_dim, layers, head_dim, channels, aux_channels, img_scale,
                 num_classes=150, mlp_ratio=4.0, pool_scales=(1, 2, 3, 6)):
        self.embed_dim = list(embed_dim)
        self.layers = list(layers)
        self.head_dim = head_dim
        self.channels = channels
        self.aux_channels = aux_channels
        self.img_scale = img_scale
        self.num_classes = num_classes
        self.mlp_ratio = mlp_ratio
        self.pool_scales = pool_scales


def small():
    """upernet_global_small: UniFormer-S, UPerHead 512 channels, FCN auxiliary head on stage 3."""
    return Config([64, 128, 320, 512], [3, 4, 8, 3], 64, 512, 256, (2048, 512))


def tiny():
    """A small config for fast end-to-end tests (the same code paths; smaller img_scale)."""
    return Config([8, 12, 16, 24], [1, 1, 2, 1], 8, 8, 8, (192, 48), num_classes=40)


# ---------------------------------------------------------------------------------------------
# The network (names = the checkpoint's keys)

class PatchEmbed(nn.Module):
    def __init__(self, c_in, c_out, patch):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, patch, stride=patch)
        self.norm = nn.LayerNorm(c_out)  # default eps 1e-5 (not the backbone's 1e-6)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LinearMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ConvBlock(nn.Module):
    """CBlock: x += dw3x3(x); x += conv2(dw5x5(conv1(BN(x)))); x += mlp(BN(x))."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class AttnBlock(nn.Module):
    """SABlock (global): x += dw3x3(x); tokens: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = LinearMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.pos_embed(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class UniFormer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, n = cfg.embed_dim, cfg.layers
        self.patch_embed1 = PatchEmbed(3, d[0], 4)
        self.patch_embed2 = PatchEmbed(d[0], d[1], 2)
        self.patch_embed3 = PatchEmbed(d[1], d[2], 2)
        self.patch_embed4 = PatchEmbed(d[2], d[3], 2)
        self.blocks1 = nn.ModuleList([ConvBlock(d[0], cfg.mlp_ratio) for _ in range(n[0])])
        self.norm1 = nn.LayerNorm(d[0], eps=1e-6)
        self.blocks2 = nn.ModuleList([ConvBlock(d[1], cfg.mlp_ratio) for _ in range(n[1])])
        self.norm2 = nn.LayerNorm(d[1], eps=1e-6)
        self.blocks3 = nn.ModuleList([AttnBlock(d[2], d[2] // cfg.head_dim, cfg.mlp_ratio)
                                      for _ in range(n[2])])
        self.norm3 = nn.LayerNorm(d[2], eps=1e-6)
        self.blocks4 = nn.ModuleList([AttnBlock(d[3], d[3] // cfg.head_dim, cfg.mlp_ratio)
                                      for _ in range(n[3])])
        self.norm4 = nn.LayerNorm(d[3], eps=1e-6)

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"blocks{i}"):
                x = blk(x)
            norm = getattr(self, f"norm{i}")
            outs.append(norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous())
        return outs


class ConvModule(nn.Module):
    """mmcv ConvModule with norm_cfg BN: conv (no bias) → BN → ReLU."""

    def __init__(self, c_in, c_out, k, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ins, ch = cfg.embed_dim, cfg.channels
        self.pool_scales = cfg.pool_scales
        self.psp_modules = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(ins[-1], ch, 1)) for s in cfg.pool_scales])
        self.bottleneck = ConvModule(ins[-1] + len(cfg.pool_scales) * ch, ch, 3, padding=1)
        self.lateral_convs = nn.ModuleList([ConvModule(c, ch, 1) for c in ins[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(ch, ch, 3, padding=1) for _ in ins[:-1]])
        self.fpn_bottleneck = ConvModule(len(ins) * ch, ch, 3, padding=1)
        self.conv_seg = nn.Conv2d(ch, cfg.num_classes, 1)

    def forward(self, feats):
        top = feats[-1]
        psp = [top] + [up(m(top), top.shape[2:]) for m in self.psp_modules]
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.bottleneck(torch.cat(psp, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + up(laterals[i], laterals[i - 1].shape[2:])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
        for i in range(len(outs) - 1, 0, -1):
            outs[i] = up(outs[i], outs[0].shape[2:])
        return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(nn.Module):
    """The auxiliary head (training only; present in the checkpoint, unused at inference)."""

    def __init__(self, cfg):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cfg.embed_dim[2], cfg.aux_channels, 3, padding=1))
        self.conv_seg = nn.Conv2d(cfg.aux_channels, cfg.num_classes, 1)


class Segmentor(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = UniFormer(cfg)
        self.decode_head = UPerHead(cfg)
        self.auxiliary_head = FCNHead(cfg)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


def build(cfg):
    return formula.fill(Segmentor(cfg)).eval()


# ---------------------------------------------------------------------------------------------
# The pipeline

def rescale_size(w, h, img_scale):
    f = min(max(img_scale) / max(h, w), min(img_scale) / min(h, w))
    return int(w * float(f) + 0.5), int(h * float(f) + 0.5)


def rescale(img, img_scale):
    h, w = img.shape[:2]
    nw, nh = rescale_size(w, h, img_scale)
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)


def normalize(img):
    x = img.astype(np.float32)
    cv2.cvtColor(x, cv2.COLOR_BGR2RGB, x)
    cv2.subtract(x, MEAN.reshape(1, -1), x)
    cv2.multiply(x, 1 / STD.reshape(1, -1), x)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def ade_palette():
    """controlnet_aux 0.0.10's `util.ade_palette()` (equal to mmseg's ADE20KDataset.PALETTE, which
    `get_palette('ade')` returns), loaded without importing the controlnet_aux package."""
    pkg = importlib.util.find_spec("controlnet_aux").submodule_search_locations[0]
    path = os.path.join(pkg, "util.py")
    spec = importlib.util.spec_from_file_location("cna_util", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ade_palette()


def colorize(seg, palette):
    """show_result(opacity=1) then show_result_pyplot's bgr2rgb, step 6."""
    palette = np.array(palette)
    color_seg = np.zeros((seg.shape[0], seg.shape[1], 3), dtype=np.uint8)
    for label, color in enumerate(palette):
        color_seg[seg == label, :] = color
    color_seg = color_seg[..., ::-1]
    img = np.zeros_like(color_seg)  # the image's weight is 1 - opacity = 0
    img = (img * (1 - 1.0) + color_seg * 1.0).astype(np.uint8)
    return img[..., ::-1].copy()


def detect(model, img, palette, keep=None):
    """Steps 2–6 on `img` (RGB, detect size); returns (hint, labels); `keep` collects x, logits."""
    h, w = img.shape[:2]
    x = normalize(rescale(img, model.cfg.img_scale))
    with torch.no_grad():
        logits = model(x)
        seg = up(logits, x.shape[2:])
        seg = up(seg, (h, w))
        labels = F.softmax(seg, dim=1).argmax(dim=1)[0].numpy()
    if keep is not None:
        keep.update(x=x, logits=logits)
    return colorize(labels, palette), labels


# ---------------------------------------------------------------------------------------------
# Fixtures

def save(name, tensors):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, name))


def net_fixture(cfg, name, img, all_feats):
    model = build(cfg)
    x = normalize(img)
    with torch.no_grad():
        feats = model.backbone(x)
        logits = model.decode_head(feats)
    t = {"x": x, "logits": logits}
    t.update({f"feat{i}": f for i, f in enumerate(feats) if all_feats or i == 3})
    save(name, t)
    return {"fixture": name, "input": list(x.shape), "logits": list(logits.shape),
            "max_abs_logit": float(logits.abs().max())}


def layout_fixture(cfg, palette):
    model = build(cfg)
    sd = model.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in sd)
    meta = {
        "mmcv_version": "1.3.0", "time": "Thu Jan  1 00:00:00 2022",
        "env_info": "formula weights, tiny config",
        "config": "model = dict(type='EncoderDecoder', backbone=dict(type='UniFormer'))",
        "CLASSES": tuple(f"class{i}" for i in range(cfg.num_classes)),
        "PALETTE": [list(p) for p in palette],
        "epoch": 0, "iter": 160000,
        "hook_msgs": {"last_ckpt": "iter_160000.pth", "best_score": np.float64(0.5)},
    }
    ckpt = {"meta": meta, "state_dict": collections.OrderedDict((k, v.clone()) for k, v in sd.items())}
    torch.save(ckpt, os.path.join(OUT, "tiny_layout.pth"))


def main():
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    os.makedirs(OUT, exist_ok=True)
    palette = ade_palette()
    manifest = {"nets": [], "cases": [], "resizes": []}
    photo = np.array(Image.open(os.path.join(INPUTS, "in_photo_96x128.png")).convert("RGB"))
    shapes = np.array(Image.open(os.path.join(INPUTS, "in_shapes_64x80.png")).convert("RGB"))

    # Network parity, fed directly (no rescale): the real config at 64×72, tiny at 52×68.
    manifest["nets"].append(net_fixture(small(), "net_small.safetensors", photo[10:58, 12:84], True))
    manifest["nets"].append(net_fixture(tiny(), "net_tiny.safetensors", photo[3:55, 20:88], False))

    # The pipeline on config tiny (img_scale (192, 48)): down-, up- and no rescale; a wide
    # image where the long side bounds the factor. Names: <source>_<height>x<width>.
    model = build(tiny())
    cases = [
        ("photo_96x128", photo),                 # 128×96 → 64×48 (down)
        ("shapes_30x38", shapes[20:50, 10:48]),  # 38×30 → 61×48 (up)
        ("shapes_48x60", shapes[8:56, 10:70]),   # 60×48 → unchanged
        ("wide_16x80", photo[40:56, 8:88]),      # 80×16 → 192×38 (long side bounds)
    ]
    for name, img in cases:
        img = np.ascontiguousarray(img)
        Image.fromarray(img).save(os.path.join(OUT, f"{name}_input.png"))
        keep = {}
        hint, labels = detect(model, img, palette, keep)
        assert labels.max() < 150
        net_input = list(keep["x"].shape[2:])
        if name not in ("photo_96x128", "shapes_30x38"):
            del keep["x"]
        save(f"{name}.safetensors", keep)
        Image.fromarray(labels.astype(np.uint8)).save(os.path.join(OUT, f"{name}_labels.png"))
        Image.fromarray(hint).save(os.path.join(OUT, f"{name}_hint.png"))
        manifest["cases"].append({"case": name, "width": img.shape[1], "height": img.shape[0],
                                  "net_input": net_input,
                                  "distinct_labels": int(len(np.unique(labels)))})

    # The rescale rule at the real img_scale (sizes only) and cv2's bilinear resize.
    for w, h in [(512, 512), (512, 768), (683, 512), (64, 64), (96, 128), (1024, 1536),
                 (100, 900), (3000, 500), (513, 511)]:
        manifest["resizes"].append({"from": [w, h], "to": list(rescale_size(w, h, (2048, 512)))})
    for w, h in [(48, 64), (130, 100), (37, 200), (96, 128)]:
        r = cv2.resize(photo, (w, h), interpolation=cv2.INTER_LINEAR)
        Image.fromarray(r).save(os.path.join(OUT, f"resize_{w}x{h}.png"))

    # Every class id through the reference's colouring.
    labels = (np.arange(15 * 20).reshape(15, 20) * 7) % 150
    Image.fromarray(labels.astype(np.uint8)).save(os.path.join(OUT, "palette_labels.png"))
    Image.fromarray(colorize(labels, palette)).save(os.path.join(OUT, "palette_hint.png"))

    layout_fixture(tiny(), palette)

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(json.dumps(manifest, indent=1))
    print(f"{total} bytes in {OUT}")
    assert total <= BUDGET, total


if __name__ == "__main__":
    main()
