"""Reference side of the `seg_ufade20k` benchmark: UniFormer-S + UPerNet as lllyasviel's ControlNet /
A1111 run it (mmseg `inference_segmentor` + `show_result_pyplot(opacity=1)`), in the torch reference
of tools/parity/neural/make_uniformer.py, on formula weights (formula.py), float32, CPU.

`detectors()` returns {preprocessor: callable(img_rgb_uint8, resolution) -> hint}; a call is what a
user's call does: `resize_image(HWC3(img), resolution)` (controlnet_aux.util, as the ControlNet
gradio app and controlnet_aux do before any detector), then the segmentor's own pipeline (rescale
to img_scale (2048, 512) keeping the ratio, normalize, network, logits back to the image size,
argmax, ADE20K palette).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity", "neural"))


def detectors():
    import make_uniformer as mu
    from controlnet_aux.util import HWC3, resize_image

    model = mu.build(mu.small())
    palette = mu.ade_palette()

    def seg(img, resolution):
        small = resize_image(HWC3(img), resolution)
        hint, _ = mu.detect(model, small, palette)
        return hint

    return {"seg_ufade20k": seg}
