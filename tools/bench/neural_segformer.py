"""Reference side of the `seg_segformer` benchmark: transformers 5.24's SegFormer as a user runs it
(controlnet_aux.util.resize_image to the detect resolution, SegformerImageProcessor — its default
torchvision backend — with the nvidia/segformer-b5-finetuned-ade-640-640 size 640x640,
SegformerForSemanticSegmentation, post_process_semantic_segmentation to the detect size, ADE20K
palette), float32 on the CPU, with the formula weights the Rust side uses
(tools/parity/neural/formula.py), loaded by from_pretrained from a hub-layout folder
(config.json + model.safetensors, hub key names). Matches `Config::ade_b5()` on the Rust side.

detectors() -> {"seg_segformer": callable(img_rgb_uint8, resolution) -> hint (H, W, 3) uint8}

Standalone: neural_segformer.py IMAGE.png [--resolution 512] [--iters 3]  (one JSON line)
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity", "neural"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROCESSOR_SIZE = 640  # nvidia/segformer-b5-finetuned-ade-640-640's preprocessor_config.json


def detectors():
    from controlnet_aux.util import HWC3, ade_palette, resize_image
    from transformers import SegformerImageProcessor

    import make_segformer

    model, _ = make_segformer.load_formula_model(make_segformer.hub_config("b5"))
    proc = SegformerImageProcessor(size={"height": PROCESSOR_SIZE, "width": PROCESSOR_SIZE})
    palette = np.array(ade_palette(), dtype=np.uint8)

    def seg(img, res):
        small = resize_image(HWC3(img), res)
        with torch.no_grad():
            inputs = proc(images=small, return_tensors="pt")
            out = model(**inputs)
            labels = proc.post_process_semantic_segmentation(out, target_sizes=[small.shape[:2]])[0]
        return palette[labels.numpy()]

    return {"seg_segformer": seg}
