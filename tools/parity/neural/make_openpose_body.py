"""Fixtures for crates/neural-annotators/tests/openpose_body.rs: the OpenPose body network and
pipeline as controlnet_aux 0.0.10 runs them (`Body.__call__`, `format_body_result`,
`OpenposeDetector.detect_poses`), on formula weights (formula.py) filled by the FILE's key names
(`conv1_1.weight`, ...; `util.transfer` maps them onto the model as the real loader does).

Writes to crates/neural-annotators/tests/fixtures/openpose_body/:

  net_input.png            a 48x40 RGB image; the network input is its BGR / 256 - 0.5
  net.safetensors          paf (1,38,5,6), heat (1,19,5,6): bodypose_model on that input
  <case>.png               pipeline inputs (what detect_poses gets, RGB): small (24x32), large
                           (144x192)
  <case>_padded.png        imageToTest_padded (the scaled, padded image; stored as RGB)
  <case>.safetensors       net.paf, net.heat   the network's maps in Body.__call__ (float32)
                           candidate (N,4), subset (M,20)   float64, Body.__call__'s results
                           poses (M,38)  detect_poses: 18 (x, y) normalised (NaN: no part),
                                         total_score, total_parts
                           small only: heatmap_avg (19,H,W), paf_avg (38,H,W) as float32
  resize.safetensors       <name>.src / <name>.dst: cv2.resize of random float32 planes
                           (INTER_LANCZOS4 / INTER_AREA), names in manifest.json
  gaussian.safetensors     <name>.src / <name>.dst: scipy.ndimage.gaussian_filter(sigma=3), f64
  scenes.safetensors       <scene>.candidate, <scene>.subset: Body.__call__ on crafted maps
  manifest.json            cases, resize and gaussian names, the crafted scenes' descriptions
                           and the hashes of the large case's image-size maps

Crafted scenes: the network is replaced by zeros and `util.smart_resize` (the last resize of
Body.__call__) returns heatmaps/PAFs drawn from a description of people with exact arithmetic
(+ - * / sqrt in float64, then float32), which the Rust test redraws bit for bit: cones of
radius 4 at each part (amplitude a/100), and for each limb a band of half-width 2 along the
segment holding its unit vector times m/100; later people overwrite earlier ones.

Run from the repository root:  /work/pyenv/bin/python tools/parity/neural/make_openpose_body.py
"""
import json
import math
import os
import sys

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formula  # noqa: E402

from controlnet_aux.open_pose import OpenposeDetector  # noqa: E402
from controlnet_aux.open_pose import body as body_mod  # noqa: E402
from controlnet_aux.open_pose import util  # noqa: E402
from controlnet_aux.open_pose.model import bodypose_model  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

OUT = os.path.join("crates", "neural-annotators", "tests", "fixtures", "openpose_body")
INPUTS = os.path.join("crates", "annotators", "tests", "fixtures")
BUDGET = 1000 * 1024

torch.set_num_threads(2)
cv2.setNumThreads(1)


def file_state_dict(model):
    """Formula weights under the file's key names (the model's keys minus their first part)."""
    return {k.split(".", 1)[1]: torch.from_numpy(formula.values(k.split(".", 1)[1], t.shape))
            for k, t in model.state_dict().items()}


def build_body():
    model = bodypose_model()
    model.load_state_dict(util.transfer(model, file_state_dict(model)))
    model.eval()
    body = body_mod.Body.__new__(body_mod.Body)
    body.model = model
    return body


def fnv_f32(a):
    """FNV-1a 64 over the little-endian bytes of a float32 array (C order)."""
    h = 0xCBF29CE484222325
    for b in np.ascontiguousarray(a, dtype="<f4").tobytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def poses_array(poses):
    rows = []
    for p in poses:
        r = []
        for k in p.body.keypoints:
            r += [np.nan, np.nan] if k is None else [k.x, k.y]
        r += [p.body.total_score, p.body.total_parts]
        rows.append(r)
    return np.array(rows, dtype=np.float64).reshape(-1, 38)


def capture(body, fn):
    """Runs fn() and returns it with the network outputs and the final (image-size) maps."""
    seen = {}
    model = body.model
    orig_resize = util.smart_resize

    def hooked(x):
        out = model.__class__.forward(model, x)
        seen["input"] = x
        seen["net"] = out
        return out

    def resize(x, s):
        y = orig_resize(x, s)
        if x.ndim == 3:  # smart_resize calls itself (through the module) per channel
            seen["heat" if x.shape[2] == 19 else "paf"] = y
        return y

    model.forward = hooked
    util.smart_resize = resize
    try:
        result = fn()
    finally:
        del model.forward
        util.smart_resize = orig_resize
    return result, seen


# ----------------------------------------------------------------------------------------------
# Crafted scenes
# ----------------------------------------------------------------------------------------------

# OpenPose COCO order: nose, neck, r shoulder, r elbow, r wrist, l shoulder, l elbow, l wrist,
# r hip, r knee, r ankle, l hip, l knee, l ankle, r eye, l eye, r ear, l ear.
TEMPLATE = [(0, 0), (0, 12), (-8, 12), (-11, 22), (-13, 32), (8, 12), (11, 22), (13, 32),
            (-5, 32), (-6, 43), (-6, 54), (5, 32), (6, 43), (6, 54), (-4, -4), (4, -4),
            (-9, -1), (9, -1)]
RADIUS = 4.0
BAND = 2.0


def person(cx, top, amp=100, paf=100, missing_parts=(), missing_limbs=(), moved=None):
    parts = [[cx + dx, top + dy] for dx, dy in TEMPLATE]
    for p, xy in (moved or {}).items():
        parts[int(p)] = list(xy)
    for p in missing_parts:
        parts[p] = None
    return {"parts": parts, "amp": amp, "paf": paf, "missing_limbs": list(missing_limbs)}


SCENES = {
    "empty": {"width": 96, "height": 72, "people": []},
    "two_people": {"width": 120, "height": 72,
                   "people": [person(32, 8), person(88, 9, amp=80, paf=90)]},
    # A's left forearm and B's right forearm reach across each other; A's and B's lower left
    # legs cross (the same PAF channels: the later person overwrites the crossing).
    "crossing": {"width": 120, "height": 72,
                 "people": [person(44, 8, moved={6: (58, 18), 7: (72, 26), 13: (70, 60)}),
                            person(76, 8, amp=90, moved={3: (62, 18), 4: (48, 26),
                                                         13: (52, 60)})]},
    # A has no left wrist; B's right forearm has no PAF (its wrist is left alone); C has no
    # right leg.
    "missing_limb": {"width": 150, "height": 72,
                     "people": [person(28, 8, missing_parts=(7,)),
                                person(75, 8, missing_limbs=(3,)),
                                person(122, 8, missing_parts=(8, 9, 10))]},
    # Neck-nose has no PAF: the head starts its own person and is merged into the body through
    # the shoulder-ear limbs (the reference's "found 2, disjoint" merge).
    "detached_head": {"width": 80, "height": 72,
                      "people": [person(40, 8, missing_limbs=(12,))]},
    # A keeps only nose, neck and right shoulder (3 parts: deleted); B has weak parts and weak
    # PAFs (mean score below 0.4: deleted); C is fine.
    "weak": {"width": 150, "height": 72,
             "people": [person(28, 8, missing_parts=tuple(p for p in range(18)
                                                         if p not in (0, 1, 2))),
                        person(75, 8, amp=30, paf=6),
                        person(122, 8)]},
}


def draw_scene(scene):
    w, h = scene["width"], scene["height"]
    heat = np.zeros((h, w, 19), np.float32)
    paf = np.zeros((h, w, 38), np.float32)
    r2 = RADIUS * RADIUS
    for p in scene["people"]:
        amp = p["amp"] / 100.0
        for part, xy in enumerate(p["parts"]):
            if xy is None:
                continue
            px, py = float(xy[0]), float(xy[1])
            for y in range(h):
                for x in range(w):
                    dx = x - px
                    dy = y - py
                    t = 1.0 - (dx * dx + dy * dy) / r2
                    if t > 0.0:
                        v = np.float32(t * amp)
                        if v > heat[y, x, part]:
                            heat[y, x, part] = v
    for p in scene["people"]:
        mag = p["paf"] / 100.0
        for k, (a, b) in enumerate(body_limbs()):
            if k in p["missing_limbs"]:
                continue
            pa, pb = p["parts"][a - 1], p["parts"][b - 1]
            if pa is None or pb is None:
                continue
            ax, ay = float(pa[0]), float(pa[1])
            bx, by = float(pb[0]), float(pb[1])
            ex = bx - ax
            ey = by - ay
            l2 = ex * ex + ey * ey
            length = math.sqrt(l2)
            ux = ex / length * mag
            uy = ey / length * mag
            cx, cy = MAP_IDX[k][0] - 19, MAP_IDX[k][1] - 19
            for y in range(h):
                for x in range(w):
                    t = ((x - ax) * ex + (y - ay) * ey) / l2
                    if t < 0.0:
                        t = 0.0
                    if t > 1.0:
                        t = 1.0
                    qx = ax + t * ex
                    qy = ay + t * ey
                    d2 = (x - qx) * (x - qx) + (y - qy) * (y - qy)
                    if d2 <= BAND * BAND:
                        paf[y, x, cx] = np.float32(ux)
                        paf[y, x, cy] = np.float32(uy)
    return heat, paf


LIMB_SEQ = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
            [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
MAP_IDX = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22],
           [23, 24], [25, 26], [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52],
           [55, 56], [37, 38], [45, 46]]


def body_limbs():
    return LIMB_SEQ


class Zeros(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # Body.__call__ asks for its device

    def forward(self, x):
        n, _, h, w = x.shape
        return torch.zeros(n, 38, h // 8, w // 8), torch.zeros(n, 19, h // 8, w // 8)


def run_scene(scene):
    heat, paf = draw_scene(scene)
    body = body_mod.Body.__new__(body_mod.Body)
    body.model = Zeros()
    orig = util.smart_resize
    util.smart_resize = lambda x, s: heat if x.shape[2] == 19 else paf
    try:
        img = np.zeros((scene["height"], scene["width"], 3), np.uint8)
        candidate, subset = body(img)
    finally:
        util.smart_resize = orig
    return np.asarray(candidate, np.float64).reshape(-1, 4), np.asarray(subset, np.float64)


# ----------------------------------------------------------------------------------------------


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    manifest = {}
    body = build_body()
    detector = OpenposeDetector(body)

    # 1. the network on a small input.
    photo = np.array(Image.open(os.path.join(INPUTS, "in_photo_48x64.png")).convert("RGB"))
    small_in = photo[4:44, 8:56].copy()
    Image.fromarray(small_in).save(os.path.join(OUT, "net_input.png"))
    x = torch.from_numpy(np.ascontiguousarray(
        np.transpose(np.float32(small_in[:, :, ::-1]), (2, 0, 1))[None] / 256 - 0.5))
    with torch.no_grad():
        paf, heat = body.model(x)
    save_file({"paf": paf.numpy(), "heat": heat.numpy()}, os.path.join(OUT, "net.safetensors"))

    # 2. the pipeline on two images.
    big = cv2.resize(np.array(Image.open(os.path.join(INPUTS, "in_photo_96x128.png"))
                              .convert("RGB")), (144, 192), interpolation=cv2.INTER_LINEAR)
    cases = {"small": photo[8:40, 20:44].copy(), "large": big}
    manifest["cases"] = {}
    for name, img in cases.items():
        Image.fromarray(img).save(os.path.join(OUT, f"{name}.png"))
        bgr = img[:, :, ::-1].copy()
        with torch.no_grad():
            (candidate, subset), seen = capture(body, lambda: body(bgr))
            poses, _ = capture(body, lambda: detector.detect_poses(img))
        inp = seen["input"].numpy()[0]
        padded = np.round((np.transpose(inp, (1, 2, 0)) + 0.5) * 256).astype(np.uint8)
        assert ((np.float32(padded) / 256 - 0.5) == np.transpose(inp, (1, 2, 0))).all()
        Image.fromarray(padded[:, :, ::-1].copy()).save(os.path.join(OUT, f"{name}_padded.png"))
        tensors = {
            "net.paf": seen["net"][0].numpy(),
            "net.heat": seen["net"][1].numpy(),
            "candidate": np.asarray(candidate, np.float64).reshape(-1, 4),
            "subset": np.asarray(subset, np.float64).reshape(-1, 20),
            "poses": poses_array(poses),
        }
        heat_maps = np.ascontiguousarray(np.transpose(seen["heat"], (2, 0, 1)))
        paf_maps = np.ascontiguousarray(np.transpose(seen["paf"], (2, 0, 1)))
        assert heat_maps.dtype == np.float32 and paf_maps.dtype == np.float32
        if name == "small":
            tensors["heatmap_avg"] = heat_maps
            tensors["paf_avg"] = paf_maps
        save_file(tensors, os.path.join(OUT, f"{name}.safetensors"))
        manifest["cases"][name] = {
            "width": img.shape[1], "height": img.shape[0], "people": len(subset),
            "candidates": len(candidate), "heatmap_fnv": fnv_f32(heat_maps),
            "paf_fnv": fnv_f32(paf_maps)}

    # 3. cv2.resize on float32 planes.
    rng = np.random.default_rng(7)
    resize = {}
    manifest["resize"] = []
    for kind, sh, sw, h, w in [
        ("lanczos4", 7, 9, 56, 72), ("lanczos4", 23, 18, 50, 37), ("lanczos4", 20, 15, 45, 31),
        ("lanczos4", 31, 30, 40, 43), ("lanczos4", 10, 13, 10, 13), ("lanczos4", 12, 9, 12, 17),
        ("area", 184, 138, 32, 24), ("area", 56, 72, 20, 30), ("area", 37, 41, 13, 17),
        ("area", 92, 46, 46, 23), ("area", 30, 42, 15, 21), ("area", 48, 36, 16, 12),
        ("area", 69, 46, 23, 23), ("area", 40, 30, 20, 30), ("area", 11, 9, 11, 9),
    ]:
        name = f"{kind}_{sw}x{sh}_{w}x{h}"
        src = rng.standard_normal((sh, sw)).astype(np.float32)
        interp = cv2.INTER_LANCZOS4 if kind == "lanczos4" else cv2.INTER_AREA
        resize[f"{name}.src"] = src
        resize[f"{name}.dst"] = cv2.resize(src, (w, h), interpolation=interp)
        manifest["resize"].append({"name": name, "kind": kind, "width": w, "height": h})
    save_file(resize, os.path.join(OUT, "resize.safetensors"))

    # 4. scipy's gaussian_filter on float64 (float32-valued, as heatmap_avg) planes.
    gauss = {}
    manifest["gaussian"] = []
    for sh, sw in [(30, 37), (5, 9), (1, 4), (26, 25), (13, 1)]:
        name = f"g_{sw}x{sh}"
        src = rng.random((sh, sw)).astype(np.float32).astype(np.float64)
        gauss[f"{name}.src"] = src
        gauss[f"{name}.dst"] = gaussian_filter(src, sigma=3)
        manifest["gaussian"].append(name)
    save_file(gauss, os.path.join(OUT, "gaussian.safetensors"))

    # 5. crafted scenes.
    scenes = {}
    manifest["scenes"] = {"radius": RADIUS, "band": BAND, "scenes": SCENES, "results": {}}
    for name, scene in SCENES.items():
        candidate, subset = run_scene(scene)
        scenes[f"{name}.candidate"] = candidate
        scenes[f"{name}.subset"] = subset.reshape(-1, 20)
        manifest["scenes"]["results"][name] = {
            "candidates": len(candidate), "people": len(subset),
            "parts": [int(s[19]) for s in subset]}
    save_file(scenes, os.path.join(OUT, "scenes.safetensors"))

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(json.dumps({k: v for k, v in manifest.items() if k in ("cases",)}, indent=1))
    print(json.dumps(manifest["scenes"]["results"], indent=1))
    print(f"{total} bytes in {OUT}")
    assert total <= BUDGET, total


if __name__ == "__main__":
    main()
