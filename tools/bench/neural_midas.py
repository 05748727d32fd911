"""Reference side of the `depth_midas` / `normal_midas` benchmark: controlnet_aux 0.0.10's
`MidasDetector` as a user calls it (HWC3, resize_image to the detect resolution, DPTDepthModel
DPT-Hybrid, min-max normalisation; for normal_midas the depth_and_normal path with A1111's
bg_th 0.4), float32 on the CPU, with the formula weights the Rust side uses
(tools/parity/neural/formula.py). Matches `midas::Config::dpt_hybrid()` on the Rust side.

detectors() -> {"depth_midas" | "normal_midas": callable(img_rgb_uint8, resolution) -> hint
                (H, W, 3) uint8}

Standalone: neural_midas.py IMAGE.png [--resolution 512] [--iters 3]  (one JSON line each)
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity", "neural"))


BG_THRESHOLD = 0.4  # A1111's default for normal_midas (controlnet_aux's own default is 0.1)


def detectors():
    from controlnet_aux.midas import MidasDetector

    import make_midas

    det = MidasDetector(make_midas.build())

    def depth(img, res):
        return det(img, detect_resolution=res, image_resolution=res, output_type="np")

    def normal(img, res):
        _, n = det(img, bg_th=BG_THRESHOLD, depth_and_normal=True, detect_resolution=res,
                   image_resolution=res, output_type="np")
        return n

    return {"depth_midas": depth, "normal_midas": normal}
