"""Fixtures for crates/neural-annotators/tests/normal_bae.rs: NormalBAE (`NNET`, architecture
'BN', EfficientNet-B5-AP encoder) as controlnet_aux 0.0.10's `NormalBaeDetector` runs it, on
formula weights (formula.py; the Rust side regenerates the same weights), CPU, float32.

The reference network is controlnet_aux's own `NNET`, built offline: its encoder loads
`tf_efficientnet_b5_ap` with `pretrained=False` from the geffnet copy vendored inside
controlnet_aux (torch.hub `source='local'`), so nothing is downloaded.

For each case it writes to crates/neural-annotators/tests/fixtures/normal_bae/:

  <case>_input.png       the network's image: for detector cases the image after
                         controlnet_aux.util.resize_image (what `detect` gets); for the
                         network-only case the image as it is (no size rule applied)
  <case>.safetensors     float32 network outputs on that image, eval mode:
                           out_res8, out_res4, out_res2, out_res1   (1, 4, h/8.. h) — the
                           decoder's four normalised outputs (x, y, z unit vector, kappa)
                           x   the normalised network input (1, 3, h, w)
  state_dict.json        [key, shape] of every floating-point tensor of NNET's state dict, in
                         order (the architecture the Rust side must read)
  <case>_hint.png        the RGB hint: for detector cases NormalBaeDetector.__call__ on the
                         original image with detect_resolution == image_resolution == the case's
                         resolution; for the network-only case the detector's post-processing
                         steps applied to out_res1

Run from the repository root:  /work/pyenv/bin/python tools/parity/neural/make_normal_bae.py
"""
import json
import os
import sys
import types

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formula  # noqa: E402

from controlnet_aux.normalbae import NormalBaeDetector  # noqa: E402
from controlnet_aux.normalbae.nets.NNET import NNET  # noqa: E402
from controlnet_aux.util import HWC3, resize_image  # noqa: E402

OUT = os.path.join("crates", "neural-annotators", "tests", "fixtures", "normal_bae")
INPUTS = os.path.join("crates", "annotators", "tests", "fixtures")
BUDGET = 1000 * 1024

torch.set_num_threads(1)
cv2.setNumThreads(1)


def build():
    """NNET exactly as NormalBaeDetector.from_pretrained builds it, formula weights, eval."""
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet",
                                 sampling_ratio=0.4, importance_ratio=0.7)
    return formula.fill(NNET(args)).eval()


def photo():
    return np.array(Image.open(os.path.join(INPUTS, "in_photo_96x128.png")).convert("RGB"))


# (case, image, detect resolution or None for a network-only case)
def cases():
    p = photo()  # 96 high, 128 wide
    return [
        # square: resize_image makes 64x64
        ("photo_64", p, 64),
        # landscape, 128 wide x 64 high: resize_image leaves the size (k = 1)
        ("crop_128x64_64", np.ascontiguousarray(p[16:80]), 64),
        # portrait 64 wide x 96 high, network only (not a x64 size, so resize_image would not
        # produce it): odd feature sizes (3 at 1/32) exercise TF "same" padding's symmetric
        # case, the even ones its asymmetric (0, 1) / (1, 2) padding
        ("crop_64x96", np.ascontiguousarray(p[:, 32:96]), None),
    ]


def post(out_res1):
    """NormalBaeDetector.__call__'s post-processing, verbatim in its steps."""
    normal = out_res1[:, :3]
    normal = ((normal + 1) * 0.5).clip(0, 1)
    normal = normal[0].permute(1, 2, 0).cpu().numpy()
    return (normal * 255.0).clip(0, 255).astype(np.uint8)


def main():
    os.makedirs(OUT, exist_ok=True)
    model = build()
    det = NormalBaeDetector(model)
    keys = [[k, list(t.shape)] for k, t in model.state_dict().items() if t.is_floating_point()]
    with open(os.path.join(OUT, "state_dict.json"), "w") as f:
        json.dump(keys, f, separators=(",", ":"))
    manifest = []
    for case, img, res in cases():
        img = HWC3(img)
        small = resize_image(img, res) if res is not None else img
        Image.fromarray(small).save(os.path.join(OUT, f"{case}_input.png"))
        with torch.no_grad():
            x = torch.from_numpy(small).float().to("cpu") / 255.0
            x = x.permute(2, 0, 1)[None]
            x = det.norm(x)
            outs = model(x)[0]
        tensors = {name: t.contiguous() for name, t in
                   zip(["out_res8", "out_res4", "out_res2", "out_res1"], outs)}
        tensors["x"] = x.contiguous()
        save_file(tensors, os.path.join(OUT, f"{case}.safetensors"))
        os.chmod(os.path.join(OUT, f"{case}.safetensors"), 0o644)
        hint = post(outs[-1])
        if res is not None:
            with torch.no_grad():
                ref = det(img, detect_resolution=res, image_resolution=res, output_type="np")
            assert ref.shape == small.shape, (ref.shape, small.shape)
            assert (ref == hint).all(), "detector differs from its own steps"
            hint = ref
        Image.fromarray(hint).save(os.path.join(OUT, f"{case}_hint.png"))
        o = outs[-1][0].numpy()
        manifest.append({
            "case": case, "width": small.shape[1], "height": small.shape[0],
            "detect_resolution": res,
            "out_res1_range": [float(o[:3].min()), float(o[:3].max())],
            "kappa_range": [float(o[3].min()), float(o[3].max())],
            "hint_distinct": int(len(np.unique(hint.reshape(-1, 3), axis=0))),
            "hint_mean": [float(v) for v in hint.reshape(-1, 3).mean(0)],
        })
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(json.dumps(manifest, indent=1))
    print(f"{total} bytes in {OUT}")
    assert total <= BUDGET, total


if __name__ == "__main__":
    main()
