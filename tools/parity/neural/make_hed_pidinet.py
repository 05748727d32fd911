"""Fixtures for crates/neural-annotators/tests/hed_pidinet.rs: HED and PiDiNet as controlnet_aux
0.0.10 runs them, on formula weights (formula.py; the Rust side regenerates the same weights).

For each case (input image, detect resolution) it writes to
crates/neural-annotators/tests/fixtures/hed_pidinet/:

  <case>_input.png          the image after controlnet_aux.util.resize_image (what `detect` gets)
  <case>.safetensors        float32 network outputs on that image:
                              hed.p1 .. hed.p5   HED's five side projections, (1, 1, h, w) each
                              pidinet            PiDiNet's last map (sigmoid, pre-threshold)
                              pidinet.logits     the same before its sigmoid
  <case>_<module>.png       the hint (grey; the reference's three channels are equal) for each of
                            softedge_hed, softedge_hedsafe, scribble_hed, softedge_pidinet,
                            softedge_pidisafe, scribble_pidinet: HEDdetector / PidiNetDetector
                            __call__ on the original image with detect_resolution ==
                            image_resolution == the case's resolution.

Run from the repository root:  /work/pyenv/bin/python tools/parity/neural/make_hed_pidinet.py
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

from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector  # noqa: E402
from controlnet_aux.pidi import PidiNetDetector  # noqa: E402
from controlnet_aux.pidi.model import pidinet  # noqa: E402
from controlnet_aux.util import resize_image  # noqa: E402

OUT = os.path.join("crates", "neural-annotators", "tests", "fixtures", "hed_pidinet")
INPUTS = os.path.join("crates", "annotators", "tests", "fixtures")
BUDGET = 1200 * 1024

# (name, input file, detect resolution, dim). Formula weights saturate HED's sigmoid on ordinary
# photos (side projections of a few hundred), so one case dims the photo (img // 16 + 1) to bring
# the soft edges into the 1..254 range; the shapes image is the one whose HED map crosses 127
# (so scribble_hed is not blank).
CASES = [
    ("dimphoto_96x128", "in_photo_96x128.png", 64, True),
    ("photo_96x128", "in_photo_96x128.png", 128, False),
    ("shapes_64x80", "in_shapes_64x80.png", 64, False),
]

torch.set_num_threads(2)
cv2.setNumThreads(1)


def main():
    os.makedirs(OUT, exist_ok=True)
    hed = formula.fill(ControlNetHED_Apache2()).float().eval()
    pidi = formula.fill(pidinet()).eval()
    hed_det = HEDdetector(hed)
    pidi_det = PidiNetDetector(pidi)
    manifest = []
    for name, file, res, dim in CASES:
        case = f"{name}_{res}"
        img = np.array(Image.open(os.path.join(INPUTS, file)).convert("RGB"))
        if dim:
            img = (img // 16 + 1).astype(np.uint8)
        small = resize_image(img, res)
        Image.fromarray(small).save(os.path.join(OUT, f"{case}_input.png"))
        with torch.no_grad():
            x = torch.from_numpy(small.copy()).float().permute(2, 0, 1)[None]
            projections = hed(x)
            xb = torch.from_numpy(small[:, :, ::-1].copy()).float().permute(2, 0, 1)[None] / 255.0
            pmap = pidi(xb)[-1]
            logits = []
            h = pidi.classifier.register_forward_hook(lambda m, i, o: logits.append(o))
            assert torch.equal(pidi(xb)[-1], pmap)
            h.remove()
        tensors = {f"hed.p{i + 1}": p.contiguous() for i, p in enumerate(projections)}
        tensors["pidinet"] = pmap.contiguous()
        tensors["pidinet.logits"] = logits[0].contiguous()
        save_file(tensors, os.path.join(OUT, f"{case}.safetensors"))
        stats = {}
        for module, det, kw in [
            ("softedge_hed", hed_det, {}),
            ("softedge_hedsafe", hed_det, {"safe": True}),
            ("scribble_hed", hed_det, {"scribble": True}),
            ("softedge_pidinet", pidi_det, {}),
            ("softedge_pidisafe", pidi_det, {"safe": True}),
            ("scribble_pidinet", pidi_det, {"scribble": True}),
        ]:
            hint = det(img, detect_resolution=res, image_resolution=res, output_type="np", **kw)
            assert hint.shape == small.shape, (hint.shape, small.shape)
            assert (hint[:, :, 0] == hint[:, :, 1]).all() and (hint[:, :, 0] == hint[:, :, 2]).all()
            Image.fromarray(hint[:, :, 0]).save(os.path.join(OUT, f"{case}_{module}.png"))
            g = hint[:, :, 0]
            stats[module] = {"mean": float(g.mean()), "zero": int((g == 0).sum()),
                             "full": int((g == 255).sum()), "distinct": int(len(np.unique(g)))}
        manifest.append({"case": case, "width": small.shape[1], "height": small.shape[0],
                         "hints": stats})
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(json.dumps(manifest, indent=1))
    print(f"{total} bytes in {OUT}")
    assert total <= BUDGET, total


if __name__ == "__main__":
    main()
