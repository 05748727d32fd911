"""Parity fixtures for the line-art annotators (crates/neural-annotators/tests/lineart.rs).

Reference: controlnet_aux 0.0.10 `LineartDetector` (`Generator(3, 1, 3)`, realistic and coarse)
and `LineartAnimeDetector` (`UnetGenerator(3, 1, 8, 64, InstanceNorm affine=False)`), with
formula weights (formula.py), on CPU in float32.

Writes to crates/neural-annotators/tests/fixtures/lineart/:
  lineart_{name}_in.png        the detect-size image (the network input is u8 / 255)
  lineart_{name}.safetensors   `out`: model(x)[0][0], f32 (H, W)
  lineart_{name}_hint.png      LineartDetector(...) hint, one grey channel
  anime_in.png                 the detect-size image
  anime_padded.png             the reference's INTER_CUBIC pad-resize (network input is
                               u8 / 127.5 - 1), opencv-python defaults (IPP on)
  anime.safetensors            `out`: model(x)[0, 0] (Hn, Wn); resize checks (below)
  anime_hint.png               LineartAnimeDetector(...) hint, opencv-python defaults (IPP on)
  anime_post_noipp.png         the reference post-processing of `out` with cv2.ipp off
  cubic_*.png / anime.safetensors `cubic_*`: cv2.resize INTER_CUBIC with IPP off
  manifest.json                sizes and the IPP-on vs IPP-off differences measured here

Run: /work/pyenv/bin/python tools/parity/neural/make_lineart.py
"""
import functools
import json
import os
import sys

import cv2
import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
import formula  # noqa: E402
from controlnet_aux.lineart import Generator, LineartDetector  # noqa: E402
from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator  # noqa: E402
from controlnet_aux.util import HWC3, resize_image  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
IN = os.path.join(ROOT, "crates/annotators/tests/fixtures")
OUT = os.path.join(ROOT, "crates/neural-annotators/tests/fixtures/lineart")

torch.set_num_threads(2)


def load(name):
    return np.array(Image.open(os.path.join(IN, name)).convert("RGB"))


def save_png(name, arr):
    Image.fromarray(arr).save(os.path.join(OUT, name), optimize=True)


def grey(hint):
    assert hint.ndim == 3 and (hint[..., 0] == hint[..., 1]).all() and (hint[..., 0] == hint[..., 2]).all()
    return hint[..., 0]


def main():
    os.makedirs(OUT, exist_ok=True)
    assert cv2.ipp.useIPP(), "the reference is opencv-python's default, IPP on"
    manifest = {}

    # --- lineart_realistic / lineart_coarse -------------------------------------------------
    gen = formula.fill(Generator(3, 1, 3)).eval()
    det = LineartDetector(gen, gen)
    for name, photo, res, coarse in [
        ("realistic", "in_photo_96x128.png", 128, False),
        ("coarse", "in_photo_48x64.png", 64, True),
    ]:
        img = HWC3(load(photo))
        x_img = resize_image(img, res)
        x = torch.from_numpy(x_img).float() / 255.0
        assert (x.numpy() == x_img.astype(np.float32) / np.float32(255.0)).all()
        with torch.no_grad():
            out = gen(x.permute(2, 0, 1)[None])[0][0].numpy()
        hint = det(img, coarse=coarse, detect_resolution=res, image_resolution=res, output_type="np")
        assert hint.shape[:2] == x_img.shape[:2]
        save_png(f"lineart_{name}_in.png", x_img)
        save_file({"out": np.ascontiguousarray(out)}, os.path.join(OUT, f"lineart_{name}.safetensors"))
        save_png(f"lineart_{name}_hint.png", grey(hint))
        manifest[f"lineart_{name}"] = {"photo": photo, "detect_resolution": res, "size_hw": list(x_img.shape[:2])}

    # --- lineart_anime ------------------------------------------------------------------------
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net = formula.fill(UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)).eval()
    adet = LineartAnimeDetector(net)
    photo, res = "in_photo_96x128.png", 128
    img = HWC3(load(photo))
    x_img = resize_image(img, res)
    H, W = x_img.shape[:2]
    Hn, Wn = 256 * int(np.ceil(H / 256.0)), 256 * int(np.ceil(W / 256.0))
    padded = cv2.resize(x_img, (Wn, Hn), interpolation=cv2.INTER_CUBIC)
    x = torch.from_numpy(padded).float() / 127.5 - 1.0
    assert (x.numpy() == padded.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).all()
    with torch.no_grad():
        raw = net(x.permute(2, 0, 1)[None])[0, 0]
        line_t = (raw * 127.5 + 127.5).numpy()
    raw = raw.numpy()
    assert (line_t == raw * np.float32(127.5) + np.float32(127.5)).all()
    hint = grey(adet(img, detect_resolution=res, image_resolution=res, output_type="np"))

    def post(line):
        line = cv2.resize(line, (W, H), interpolation=cv2.INTER_CUBIC)
        return 255 - line.clip(0, 255).astype(np.uint8)

    assert (post(line_t) == hint).all(), "the hint is the documented post-processing"
    tensors = {"out": np.ascontiguousarray(raw)}
    cv2.ipp.setUseIPP(False)
    try:
        post_noipp = post(line_t)
        padded_noipp = cv2.resize(x_img, (Wn, Hn), interpolation=cv2.INTER_CUBIC)
        # Resizer checks on odd sizes (OpenCV's own code: IPP off).
        small = load("in_photo_48x64.png")
        cub_u8_a = cv2.resize(small, (256, 256), interpolation=cv2.INTER_CUBIC)
        cub_u8_b = cv2.resize(small, (77, 100), interpolation=cv2.INTER_CUBIC)
        tensors["cubic_f32_77x100"] = cv2.resize(line_t, (77, 100), interpolation=cv2.INTER_CUBIC)
        tensors["cubic_f32_61x45"] = cv2.resize(line_t, (61, 45), interpolation=cv2.INTER_CUBIC)
    finally:
        cv2.ipp.setUseIPP(True)
    save_png("anime_in.png", x_img)
    save_png("anime_padded.png", padded)
    save_file(tensors, os.path.join(OUT, "anime.safetensors"))
    save_png("anime_hint.png", hint)
    save_png("anime_post_noipp.png", post_noipp)
    save_png("cubic_u8_48x64_to_256x256.png", cub_u8_a)
    save_png("cubic_u8_48x64_to_77x100.png", cub_u8_b)
    manifest["lineart_anime"] = {
        "photo": photo,
        "detect_resolution": res,
        "size_hw": [H, W],
        "padded_hw": [Hn, Wn],
        "ipp_vs_noipp_padded_bytes_differing": int((padded != padded_noipp).sum()),
        "ipp_vs_noipp_hint_pixels_differing": int((post_noipp != hint).sum()),
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
