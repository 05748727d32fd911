#!/usr/bin/env python3
"""Times the reference detectors for the network preprocessors on one image, on CPU, with the
same formula weights as the Rust benchmark (tools/parity/neural/formula.py): the whole detector
call (resize to the detect resolution, network, post-processing), float32. controlnet_aux
0.0.10's detectors, and for the later networks the references in tools/bench/neural_*.py
(Depth Anything V2 ViT-L, SegFormer-B5 at 640 through transformers, UniFormer-S in torch).

Usage: annotators_torch.py IMAGE.png [--resolution 512] [--iters 3] [--only a,b]
Prints one JSON line per preprocessor.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity", "neural"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import formula  # noqa: E402


def detectors():
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector
    from controlnet_aux.lineart import Generator, LineartDetector
    from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator
    from controlnet_aux.mlsd import MLSDdetector
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet
    import functools

    hed = HEDdetector(formula.fill(ControlNetHED_Apache2()).float().eval())
    pidi = PidiNetDetector(formula.fill(pidinet()).eval())
    mlsd = MLSDdetector(formula.fill(MobileV2_MLSD_Large()).eval())
    lineart = LineartDetector(formula.fill(Generator(3, 1, 3)).eval(), formula.fill(Generator(3, 1, 3)).eval())
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    anime = LineartAnimeDetector(formula.fill(UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)).eval())
    return {
        "softedge_hed": lambda img, r: hed(img, r, r),
        "softedge_hedsafe": lambda img, r: hed(img, r, r, safe=True),
        "scribble_hed": lambda img, r: hed(img, r, r, scribble=True),
        "softedge_pidinet": lambda img, r: pidi(img, r, r),
        "softedge_pidisafe": lambda img, r: pidi(img, r, r, safe=True),
        "scribble_pidinet": lambda img, r: pidi(img, r, r, scribble=True),
        "mlsd": lambda img, r: mlsd(img, 0.1, 0.1, r, r),
        "lineart_realistic": lambda img, r: lineart(img, False, r, r),
        "lineart_coarse": lambda img, r: lineart(img, True, r, r),
        "lineart_anime": lambda img, r: anime(img, r, r),
    }


# The part-2/3 networks, each from its own tools/bench/neural_*.py: what each serves (so that
# --only builds just the networks asked for: the large ones take a while to fill) and the
# library whose implementation it runs.
NEURAL = {
    "neural_midas": (["depth_midas", "normal_midas"], "controlnet_aux"),
    "neural_depth_anything_v2": (["depth_anything_v2"], "transformers"),
    "neural_normal_bae": (["normal_bae"], "controlnet_aux"),
    "neural_uniformer": (["seg_ufade20k"], "UniFormer torch reference"),
    "neural_segformer": (["seg_segformer"], "transformers"),
    "neural_openpose": (["openpose", "openpose_full"], "controlnet_aux"),
}


def version(package):
    try:
        return " " + __import__(package).__version__
    except ImportError:
        return ""


def neural_detectors(only):
    """{preprocessor: (callable, implementation label)} for the networks --only asks for."""
    import importlib
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    out = {}
    for module, (names, library) in NEURAL.items():
        if only and not any(n in only for n in names):
            continue
        label = library + (version(library) if library in ("controlnet_aux", "transformers") else "")
        for name, run in importlib.import_module(module).detectors().items():
            out[name] = (run, label)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    img = np.array(Image.open(args.image).convert("RGB"))
    only = args.only.split(",") if args.only else None
    runs = {name: (run, "controlnet_aux" + version("controlnet_aux")) for name, run in detectors().items()}
    runs.update(neural_detectors(only))
    with torch.no_grad():
        for name, (run, library) in runs.items():
            if only and name not in only:
                continue
            run(img, args.resolution)  # warm-up
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                run(img, args.resolution)
                times.append(time.perf_counter() - t)
            times.sort()
            print(json.dumps({"impl": f"{library} / torch {torch.__version__}",
                              "preprocessor": name, "median_s": times[len(times) // 2], "min_s": times[0],
                              "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
