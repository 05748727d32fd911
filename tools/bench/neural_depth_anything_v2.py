"""Reference side of the `depth_anything_v2` benchmark: A1111's DepthAnythingV2Detector call
(BGR2RGB on the RGB image, INTER_CUBIC resize to a 518 lower bound in float64, ImageNet
normalisation, network, bilinear back, min-max, uint8; grey) on transformers'
DepthAnythingForDepthEstimation with the original DINOv2 position-embedding interpolation, on
formula weights (tools/parity/neural/make_depth_anything_v2.py builds both), float32, CPU.

`detectors()` returns {preprocessor: callable(img_rgb_uint8, resolution) -> hint}; the image is
first resized to the detect resolution with controlnet_aux.util.resize_image, as the Rust side's
`annotators::ops::resize_image` does (A1111 itself edge-pads to a multiple of 64 and crops).

Size: ViT-L (A1111's file) unless DEPTH_ANYTHING_V2_SIZE is vits or vitb.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity", "neural"))


def detectors():
    import torch
    from controlnet_aux.util import resize_image

    import make_depth_anything_v2 as da

    size = os.environ.get("DEPTH_ANYTHING_V2_SIZE", "vitl")
    da.use_original_interpolation(True)
    model = da.build(size).float().eval()

    def run(img, r):
        with torch.no_grad():
            return da.a1111(model, resize_image(img, r))

    return {"depth_anything_v2": run}
