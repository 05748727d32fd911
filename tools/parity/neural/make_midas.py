"""Fixtures for crates/neural-annotators/tests/midas.rs: MiDaS DPT-Hybrid (`DPTDepthModel`,
backbone `vitb_rn50_384`, readout `project`, non_negative) as controlnet_aux 0.0.10's
`MidasDetector` runs it, on formula weights (formula.py; the Rust side regenerates the same
weights). The full architecture (123 M parameters) runs at small detect sizes.

For each case (input image, detect resolution) it writes to
crates/neural-annotators/tests/fixtures/midas/:

  <case>_input.png               the image after controlnet_aux.util.resize_image (what `detect`
                                 gets)
  <case>.safetensors             float32 tensors on that image:
                                   depth   the network output, (1, h, w) (DPTDepthModel.forward)
  <case>_depth_midas.png         MidasDetector(img, detect_resolution=res, image_resolution=res)
                                 (grey; the reference's three channels are equal)
  <case>_normal_midas_<bg>.png   the normal map of MidasDetector(..., depth_and_normal=True,
                                 bg_th=bg, a=2*pi) for bg in BG_THRESHOLDS (RGB as returned)

and manifest.json (sizes, hint statistics). Run from the repository root:

    HF_HUB_OFFLINE=1 /work/pyenv/bin/python tools/parity/neural/make_midas.py
"""
import json
import os
import sys

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formula  # noqa: E402

from controlnet_aux.midas import MidasDetector  # noqa: E402
from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel  # noqa: E402
from controlnet_aux.util import resize_image  # noqa: E402

OUT = os.path.join("crates", "neural-annotators", "tests", "fixtures", "midas")
INPUTS = os.path.join("crates", "annotators", "tests", "fixtures")
BUDGET = 1000 * 1024
BG_THRESHOLDS = [0.4, 0.1]

# (name, input file, crop (rows, cols) or None, detect resolution): 64x64 (square token grid
# 4x4), 64x128 (grid 4x8) and 128x192 (grid 8x12, position embeddings resized to a non-square
# grid, odd ResNet stage sizes nowhere since sizes are multiples of 64).
CASES = [
    ("shapes_64x80", "in_shapes_64x80.png", None, 64),
    ("photocrop_48x96", "in_photo_96x128.png", (48, 96), 64),
    ("photo_96x128", "in_photo_96x128.png", None, 128),
]

def build():
    """The reference network on formula weights, float32, eval mode."""
    model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    return formula.fill(model).float().eval()


def main():
    torch.set_num_threads(2)
    cv2.setNumThreads(1)
    os.makedirs(OUT, exist_ok=True)
    model = build()
    det = MidasDetector(model)
    manifest = []
    for name, file, crop, res in CASES:
        case = f"{name}_{res}"
        img = np.array(Image.open(os.path.join(INPUTS, file)).convert("RGB"))
        if crop is not None:
            img = np.ascontiguousarray(img[: crop[0], : crop[1]])
        small = resize_image(img, res)
        Image.fromarray(small).save(os.path.join(OUT, f"{case}_input.png"))
        with torch.no_grad():
            x = torch.from_numpy(small.copy()).float() / 127.5 - 1.0
            x = x.permute(2, 0, 1)[None].contiguous()
            depth = model(x)
        save_file({"depth": depth.contiguous()}, os.path.join(OUT, f"{case}.safetensors"))
        stats = {}
        hint = det(img, detect_resolution=res, image_resolution=res, output_type="np")
        assert hint.shape == small.shape, (hint.shape, small.shape)
        assert (hint[:, :, 0] == hint[:, :, 1]).all() and (hint[:, :, 0] == hint[:, :, 2]).all()
        Image.fromarray(hint[:, :, 0]).save(os.path.join(OUT, f"{case}_depth_midas.png"))
        g = hint[:, :, 0]
        stats["depth_midas"] = {"mean": float(g.mean()), "zero": int((g == 0).sum()),
                                "full": int((g == 255).sum()), "distinct": int(len(np.unique(g)))}
        for bg in BG_THRESHOLDS:
            d2, normal = det(img, bg_th=bg, depth_and_normal=True, detect_resolution=res,
                             image_resolution=res, output_type="np")
            assert (d2 == hint).all()
            assert normal.shape == small.shape
            Image.fromarray(normal).save(os.path.join(OUT, f"{case}_normal_midas_{bg}.png"))
            stats[f"normal_midas_{bg}"] = {
                "mean": [float(normal[:, :, c].mean()) for c in range(3)],
                "flat": int((normal == np.array([255, 127, 127], np.uint8)).all(axis=2).sum()),
                "distinct": int(len(np.unique(normal.reshape(-1, 3), axis=0))),
            }
        manifest.append({"case": case, "width": small.shape[1], "height": small.shape[0],
                         "depth_min": float(depth.min()), "depth_max": float(depth.max()),
                         "hints": stats})
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(json.dumps(manifest, indent=1))
    print(f"{total} bytes in {OUT}")
    assert total <= BUDGET, total


if __name__ == "__main__":
    main()
