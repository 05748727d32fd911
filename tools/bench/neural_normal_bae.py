"""Reference side of the `normal_bae` benchmark: controlnet_aux 0.0.10's NormalBaeDetector
(`NNET`, architecture 'BN', EfficientNet-B5-AP encoder built offline from the geffnet copy
vendored in controlnet_aux, pretrained=False) on the formula weights of
tools/parity/neural/formula.py, on CPU, float32, eval mode — called as a user calls it
(resize to the detect resolution, network, post-processing).

`detectors()` returns {preprocessor: callable(img_rgb_uint8, resolution) -> hint}, in the style
of tools/bench/annotators_torch.py. Run directly to time it:

    neural_normal_bae.py IMAGE.png [--resolution 512] [--iters 3]
"""
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity", "neural"))


import formula  # noqa: E402


def detectors():
    from controlnet_aux.normalbae import NormalBaeDetector
    from controlnet_aux.normalbae.nets.NNET import NNET

    # NormalBaeDetector.from_pretrained's model, without the checkpoint.
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet",
                                 sampling_ratio=0.4, importance_ratio=0.7)
    det = NormalBaeDetector(formula.fill(NNET(args)).float().eval())
    return {
        "normal_bae": lambda img, r: det(img, detect_resolution=r, image_resolution=r, output_type="np"),
    }
