"""Parity fixtures for the M-LSD annotator (crates/neural-annotators/src/mlsd.rs).

Reference: controlnet_aux 0.0.10 `MLSDdetector` / `MobileV2_MLSD_Large` / `pred_lines`, with
formula weights (formula.py) instead of mlsd_large_512_fp32.pth. Writes
crates/neural-annotators/tests/fixtures/mlsd/:

* mlsd.safetensors
  - input_<img>  (1, 4, H, W) f32   the model input pred_lines builds
  - map_<img>    (1, 9, H/2, W/2) f32  the model output
  - craft_<c>    (1, 5, h, w) f32   crafted output maps (channels 0..5; the fake model pads
                                    them with zeros to 9) that exercise decoding: tied scores
                                    straddling the top-200 cut, scores exactly at thr_v,
                                    distances exactly at thr_d, off-image and short segments,
                                    and one segment with coordinates beyond OpenCV's int range
  - lines_<case> (N, 4) f64         pred_lines' segments (absent if pred_lines raised)
  - topk_<n>     (200,) i64         torch.topk indices on a tie-heavy vector (see below)
  - sigmoid_x, sigmoid_y (8192,) f32  torch.sigmoid on the CPU
  - cvline_<s>   (N, h, w) u8 and cvline_<s>_pts (N, 4) i64: cv2.line, thickness 1, per row
* hint_<case>.png  the detector's output, channel 0 (gray)
* <img>.png        the detect-size input images
* meta.json        the cases: image / map, thresholds, whether pred_lines raised

Run: /work/pyenv/bin/python tools/parity/neural/make_mlsd.py
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import formula  # noqa: E402
import controlnet_aux.mlsd as mlsd_mod  # noqa: E402
from controlnet_aux.mlsd import MLSDdetector  # noqa: E402
from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large  # noqa: E402
from controlnet_aux.mlsd.utils import pred_lines  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
OUT = os.path.join(ROOT, "crates/neural-annotators/tests/fixtures/mlsd")
IMGS = os.path.join(ROOT, "crates/annotators/tests/fixtures")

# Our detectors receive the image already at its detect size: make the reference's own
# resize_image the identity so __call__ runs on exactly that image (its final resize to the
# same size is then a copy as well).
mlsd_mod.resize_image = lambda img, res: img

tensors = {}
meta = {"images": {}, "cases": []}


def load_rgb(name):
    return cv2.cvtColor(cv2.imread(os.path.join(IMGS, name)), cv2.COLOR_BGR2RGB)


def model_input(img):
    h, w, _ = img.shape
    x = np.concatenate([img, np.ones([h, w, 1])], axis=-1).transpose((2, 0, 1))
    return (np.expand_dims(x, 0).astype("float32") / 127.5) - 1.0


class FakeModel(torch.nn.Module):
    """Returns a fixed output map (pred_lines only needs parameters() and a call)."""

    def __init__(self, out):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.out = out

    def forward(self, x):
        return self.out


def run_case(case, model, img, thr_v, thr_d):
    h, w, _ = img.shape
    try:
        with torch.no_grad():
            lines = pred_lines(img, model, [h, w], thr_v, thr_d)
        tensors[f"lines_{case}"] = np.ascontiguousarray(lines, dtype=np.float64)
        raised = False
    except Exception as e:  # the detector swallows these too
        raised = type(e).__name__
    hint = MLSDdetector(model)(img, thr_v, thr_d, detect_resolution=min(h, w),
                               image_resolution=min(h, w), output_type="np")
    assert hint.shape == (h, w, 3) and (hint[..., 0] == hint[..., 1]).all()
    cv2.imwrite(os.path.join(OUT, f"hint_{case}.png"), hint[..., 0])
    n = 0 if raised else len(tensors[f"lines_{case}"])
    print(f"{case}: {n} lines, raised={raised}, {int((hint[..., 0] > 0).sum())} px")
    return {"case": case, "thr_v": thr_v, "thr_d": thr_d, "raised": raised, "lines": n,
            "lit_pixels": int((hint[..., 0] > 0).sum())}


def craft(rng, h, w, groups, extra):
    """A (1, 5, h, w) map: centre logits noise around -9 with planted peaks; displacements."""
    m = np.zeros((1, 5, h, w), np.float32)
    m[0, 0] = rng.normal(-9.0, 1.5, (h, w))
    pos = rng.permutation(h * w)
    k = 0
    for logit, count in groups:
        for _ in range(count):
            y, x = divmod(int(pos[k]), w)
            k += 1
            m[0, 0, y, x] = logit() if callable(logit) else logit
    # displacements: mostly within ±25 px, some short (< 2), some far off the image
    d = rng.uniform(-25, 25, (4, h, w))
    short = rng.random((h, w)) < 0.15
    d[:, short] = rng.uniform(-1.0, 1.0, (4, int(short.sum())))
    far = rng.random((h, w)) < 0.1
    d[:, far] = rng.uniform(-400, 400, (4, int(far.sum())))
    m[0, 1:5] = d.astype(np.float32)
    for (y, x), (logit, disp) in extra:
        m[0, 0, y, x] = logit
        m[0, 1:5, y, x] = disp
    return m


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    model = formula.fill(MobileV2_MLSD_Large()).eval()

    # 1. the network on two images at their own size (both sides ≡ 0 mod 16)
    for name, file in [("photo", "in_photo_96x128.png"), ("shapes", "in_shapes_64x80.png")]:
        img = load_rgb(file)
        cv2.imwrite(os.path.join(OUT, f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        x = model_input(img)
        with torch.no_grad():
            y = model(torch.from_numpy(x)).numpy()
        tensors[f"input_{name}"] = x
        tensors[f"map_{name}"] = y
        meta["images"][name] = list(img.shape[:2])
        # Formula weights give very negative centre logits (heat ≤ 2e-4, ~40 local maxima with
        # non-zero heat): tiny value thresholds let those through.
        for j, (tv, td) in enumerate([(1e-30, 0.1), (1e-6, 20.0), (0.1, 0.1)]):
            meta["cases"].append({"image": name, **run_case(f"{name}_{j}", model, img, tv, td)})

    # sizes the reference network cannot run (feature maps do not line up / map < 200 px):
    # controlnet_aux returns a black map.
    photo = load_rgb("in_photo_96x128.png")
    meta["black_sizes"] = []
    for hh, ww in [(72, 80), (96, 120), (16, 16), (100, 128)]:
        img = np.ascontiguousarray(photo[:hh, :ww]) if hh <= 96 else cv2.resize(photo, (ww, hh))
        hint = MLSDdetector(model)(img, 1e-30, 0.0, detect_resolution=min(hh, ww),
                                   image_resolution=min(hh, ww), output_type="np")
        assert hint.shape == (hh, ww, 3) and hint.max() == 0, (hh, ww)
        meta["black_sizes"].append([hh, ww])

    # 2. crafted maps for the decoder
    rng = np.random.default_rng(1234)
    # big: 112×120 = 13440 ≥ 64·200 → torch.topk's std::partial_sort path.
    # 100 saturated peaks (heat exactly 1.0), a peak at logit 5 whose start point is beyond
    # int32 (cv2.line raises: drawing stops there) but whose length is 25, then 300 peaks tied
    # at sigmoid(1) straddling the top-200 cut, then noise.
    big = craft(rng, 112, 120, [(30.0, 100), (1.0, 300), (lambda: rng.uniform(-4, 0.5), 400)],
                [((50, 60), (5.0, [3.0e9, 1.0, 3.0e9, 26.0]))])
    # small: 40×48 = 1920 < 64·200 → nth_element + sort path. Peaks exactly at 0.5
    # (logit 0), 150 ties at sigmoid(2), distances exactly 20, negative fractional endpoints.
    extra = [((3 + 4 * i, 5 + 3 * i), (3.0, [0.0, 0.0, 12.0, 16.0])) for i in range(6)]
    extra += [((30, 2 + 5 * i), (2.5, [-0.5, -0.99, 7.5, -3.25])) for i in range(6)]
    small = craft(rng, 40, 48, [(0.0, 60), (2.0, 150), (lambda: rng.uniform(-2, 4), 60)], extra)
    for name, m, pairs in [("big", big, [(0.5, 2.0), (0.5, 30.0)]),
                           ("small", small, [(0.5, 20.0), (1e-4, 0.5), (0.5, 19.99)])]:
        tensors[f"craft_{name}"] = m
        h, w = m.shape[2:]
        full = np.zeros((1, 9, h, w), np.float32)
        full[:, :5] = m
        fake = FakeModel(torch.from_numpy(full))
        img = np.zeros((2 * h, 2 * w, 3), np.uint8)
        for j, (tv, td) in enumerate(pairs):
            meta["cases"].append({"map": name, **run_case(f"{name}_{j}", fake, img, tv, td)})

    # 3. torch.topk's order of ties (both algorithms), on vectors both sides generate:
    # v[i] = (i · 0x9E3779B97F4A7C15 mod 2^64) >> 60, 16 levels.
    for n in [3000, 20000]:
        with np.errstate(over="ignore"):
            v = ((np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
                 >> np.uint64(60)).astype(np.float32)
        tensors[f"topk_{n}"] = torch.topk(torch.from_numpy(v), 200).indices.numpy()

    # torch.sigmoid (CPU, f32) on logits over the range that matters
    x = np.concatenate([rng.uniform(-30, 30, 6144), rng.normal(0, 3, 2048)]).astype(np.float32)
    tensors["sigmoid_x"] = x
    tensors["sigmoid_y"] = torch.sigmoid(torch.from_numpy(x)).numpy()

    # 4. cv2.line table
    table = [((5, 5), (20, 9)), ((20, 9), (5, 5)), ((3, 1), (7, 20)), ((7, 20), (3, 1)),
             ((0, 0), (31, 23)), ((31, 0), (0, 23)), ((10, 10), (10, 10)), ((-5, -5), (-5, -5)),
             ((-10, 5), (40, 12)), ((16, -30), (18, 50)), ((-100, -80), (300, 200)),
             ((40, 3), (-7, 20)), ((-3, -3), (-40, 30)), ((5, 30), (25, 24)), ((0, 12), (31, 12)),
             ((12, 0), (12, 23)), ((2, 2), (30, 3)), ((2, 2), (3, 22)), ((29, 21), (1, 2)),
             ((-2147483648, 5), (2147483647, 18)), ((5, -2147483648), (20, 2147483647)),
             ((-1000000, -999999), (1000000, 1000001)), ((31, 23), (32, 24)), ((32, 5), (50, 5))]
    for _ in range(120):
        lim = int(rng.choice([30, 80, 5000, 2 ** 31 - 1]))
        table.append((tuple(int(v) for v in rng.integers(-lim, lim, 2)),
                      tuple(int(v) for v in rng.integers(-lim, lim, 2))))
    for s, (hh, ww) in {"a": (24, 32), "b": (7, 3)}.items():
        imgs, pts = [], []
        for p0, p1 in table:
            if s == "b":
                p0, p1 = (p0[0] // 5, p0[1] // 3), (p1[0] // 5, p1[1] // 3)
            a = np.zeros((hh, ww, 3), np.uint8)
            cv2.line(a, p0, p1, [255, 255, 255], 1)
            imgs.append(a[..., 0])
            pts.append([p0[0], p0[1], p1[0], p1[1]])
        tensors[f"cvline_{s}"] = np.stack(imgs)
        tensors[f"cvline_{s}_pts"] = np.array(pts, np.int64)

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(OUT, "mlsd.safetensors"))
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"fixtures: {total} bytes")


if __name__ == "__main__":
    main()
