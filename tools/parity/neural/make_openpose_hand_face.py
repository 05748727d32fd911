"""Fixtures for crates/neural-annotators/tests/openpose_hand_face.rs: OpenPose hands and face as
controlnet_aux 0.0.10 runs them (open_pose/hand.py, face.py, util.py, __init__.py), on formula
weights (formula.py, by the weight FILES' key names; the hand model gets them through the
reference's own util.transfer) and on a crafted "stub" network.

Writes to crates/neural-annotators/tests/fixtures/openpose_hand_face/:

  image.png              the detect image (RGB, 128x96: annotators' in_photo_96x128.png); the
                         reference works on it flipped to BGR, as detect_poses does
  net_input.png          a 40x48 (w x h) BGR-as-stored crop the networks are run on directly
  maps.safetensors       float32 / float64 tensors:
    hand.out             handpose_model(net_input / 256 - 0.5), (1, 22, 6, 5)
    face.out             FaceNet(...)[-1] on the same input, (1, 71, 6, 5)
    stub.left.p{k}       the reference's own heatmap_avg[:, :, k] (float64, 128x128) for the
                         stub network's left hand, parts k in STUB_PARTS (captured where
                         Hand.__call__ hands it to gaussian_filter)
    formula.left.p{k}    the same with formula weights (scales FORMULA_SCALES), part k = 0
    formula.left.out{i}  handpose_model's output for the left hand at scale i (formula weights)
    formula.face_a       Face.__call__'s heatmaps (float32, 71 x 24 x 24) for face case A
    gauss.in / gauss.out a random float64 40x30 map and scipy's gaussian_filter(sigma=3)
    lanczos.* / area.*   random float32 maps and cv2.resize(INTER_LANCZOS4 / INTER_AREA)
  formula_left_in{i}.png the left hand's network input at scale i (the padded BGR crop, as
                         stored: (x + 0.5) * 256 of the reference's tensor)
  expected.json          boxes of util.handDetect / util.faceDetect on hand-made bodies (their
                         keypoints as float64 bit patterns), and the detect_hands / detect_face
                         results (normalised float32 values as their bit patterns: serde_json's
                         default float parsing is not always correctly rounded)

The reference's scale_search (hands) and w_size (face) are local constants of Hand.__call__ /
Face.__call__; the formula-weight cases run those very functions with only that constant
replaced (FORMULA_SCALES, FORMULA_FACE_SIZE; source rewritten by `_with_constant`), so the Rust
test can run the network at small sizes. The stub cases keep the real constants: the stub
network costs nothing, its maps are a formula of the input size (stub_maps, mirrored in the
Rust test).

Run from the repository root:  HF_HUB_OFFLINE=1 /work/pyenv/bin/python tools/parity/neural/make_openpose_hand_face.py
"""
import inspect
import json
import os
import sys
import textwrap

import cv2
import numpy as np
import scipy.ndimage
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formula  # noqa: E402

from controlnet_aux.open_pose import OpenposeDetector, util  # noqa: E402
from controlnet_aux.open_pose import face as face_mod  # noqa: E402
from controlnet_aux.open_pose import hand as hand_mod  # noqa: E402
from controlnet_aux.open_pose.body import BodyResult, Keypoint  # noqa: E402
from controlnet_aux.open_pose.face import Face, FaceNet  # noqa: E402
from controlnet_aux.open_pose.hand import Hand  # noqa: E402
from controlnet_aux.open_pose.model import handpose_model  # noqa: E402

OUT = os.path.join("crates", "neural-annotators", "tests", "fixtures", "openpose_hand_face")
IMAGE = os.path.join("crates", "annotators", "tests", "fixtures", "in_photo_96x128.png")
BUDGET = 1000 * 1024
FORMULA_SCALES = [0.125, 0.375]
FORMULA_FACE_SIZE = 64
STUB_PARTS = [0, 5]

torch.set_num_threads(2)
cv2.setNumThreads(1)


def kp(x, y):
    return Keypoint(x=float(x), y=float(y))


def body_of(points):
    """BodyResult from {index: (x, y)} (pixels), the rest None."""
    kps = [kp(*points[i]) if i in points else None for i in range(18)]
    return BodyResult(keypoints=kps, total_score=1.0, total_parts=len(points))


# Person A: both arms and the face in the image; face B: at the right edge (crop cut by it).
PERSON_A = {0: (60, 20), 14: (57, 17), 15: (63, 17), 16: (52, 20), 17: (66, 19),
            1: (60, 30), 2: (50, 30), 3: (38, 50), 4: (30, 66), 5: (70, 30), 6: (85, 50),
            7: (95, 62)}
FACE_B = {0: (120, 50), 14: (116, 47), 16: (112, 50)}


def file_state_dict(keys_shapes):
    """Formula values by the FILE's key names."""
    return {k: torch.from_numpy(formula.values(k, s)) for k, s in keys_shapes}


def load_hand():
    model = handpose_model()
    file_keys = [(".".join(k.split(".")[1:]), tuple(v.shape)) for k, v in model.state_dict().items()]
    sd = file_state_dict(file_keys)
    hand = Hand.__new__(Hand)
    hand.model = model
    model.load_state_dict(util.transfer(model, sd))
    model.eval()
    return hand


def load_face():
    face = Face.__new__(Face)
    face.model = formula.fill(FaceNet()).eval()
    return face


def _with_constant(func, old, new_name, module):
    """The reference function `func` with the line `old` replaced by `<name> = <new_name>`
    (a global of the returned function)."""
    src = textwrap.dedent(inspect.getsource(func))
    assert src.count(old) == 1, old
    name = old.split("=")[0].strip()
    src = src.replace(old, f"{name} = {new_name}")
    ns = dict(vars(module))
    exec(compile(src, f"<{func.__qualname__} rewritten>", "exec"), ns)
    return ns[func.__name__], ns


class Capture:
    """Records the maps Hand.__call__ passes to gaussian_filter (its float64 heatmap_avg[:, :, part])."""

    def __init__(self):
        self.maps = []

    def __call__(self, x, sigma):
        self.maps.append(np.array(x, copy=True))
        return scipy.ndimage.gaussian_filter(x, sigma=sigma)


def stub_maps(channels, oh, ow):
    """The stub network's output for an input of (8*oh)x(8*ow): two blobs per map (a sharp one
    and a broad one), all float32 operations, mirrored by the Rust test."""
    f32 = np.float32
    i = np.arange(oh, dtype=f32)[:, None] * np.ones((1, ow), f32)
    j = np.ones((oh, 1), f32) * np.arange(ow, dtype=f32)[None, :]
    out = np.zeros((channels, oh, ow), f32)
    for c in range(channels):
        cy1 = f32(((c * 3) % 10 + 0.5) / 10.0 * oh)
        cx1 = f32(((c * 7) % 10 + 0.5) / 10.0 * ow)
        cy2 = f32(((c * 9 + 1) % 10 + 0.5) / 10.0 * oh)
        cx2 = f32(((c * 5 + 3) % 10 + 0.5) / 10.0 * ow)
        s1 = f32(oh * ow * 0.002 * (1 + c % 3))
        s2 = f32(oh * ow * 0.02)
        a1 = f32(0.0 if c % 7 == 6 else 0.9)
        a2 = f32(0.0 if c % 7 == 6 else 0.3)
        dy1, dx1, dy2, dx2 = i - cy1, j - cx1, i - cy2, j - cx2
        d1 = dy1 * dy1 + dx1 * dx1
        d2 = dy2 * dy2 + dx2 * dx2
        v1 = a1 / (f32(1) + d1 / s1)
        v2 = a2 / (f32(1) + d2 / s2)
        out[c] = (v1 + v2) - f32(0.1)
    return out


class StubNet(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        _, _, h, w = x.shape
        out = torch.from_numpy(stub_maps(self.channels, h // 8, w // 8))[None]
        if self.channels == 71:  # FaceNet returns the six stages; Face.__call__ takes the last
            return [out] * 6
        return out


def f32_bits(v):
    return int(np.float32(v).view(np.uint32))


def f64_bits(v):
    return int(np.float64(v).view(np.uint64))


def keypoints_json(result):
    """Keypoints as float32 bit patterns (serde_json's default float parsing is not always
    correctly rounded; integers are exact)."""
    if result is None:
        return None
    for k in result:
        assert np.float32(k.x) == k.x and np.float32(k.y) == k.y
    return [[f32_bits(k.x), f32_bits(k.y)] for k in result]


class Recorder(torch.nn.Module):
    """Wraps a network, recording its inputs and outputs."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x):
        y = self.net(x)
        self.calls.append((x.clone(), y.clone()))
        return y


def box_cases(rng):
    """Hand-made bodies (pixels) with util.handDetect / util.faceDetect on a W x H image."""
    cases = []
    fixed = [
        ("person_a", PERSON_A, 128, 96),
        ("face_b_edge", FACE_B, 128, 96),
        ("missing_left_wrist", {k: v for k, v in PERSON_A.items() if k != 7}, 128, 96),
        ("missing_right_elbow", {k: v for k, v in PERSON_A.items() if k != 3}, 128, 96),
        ("no_arms", {0: (60, 20), 14: (57, 17)}, 128, 96),
        ("small_hand_dropped", {2: (50, 30), 3: (52, 33), 4: (54, 36), 5: (70, 30), 6: (80, 40), 7: (90, 50)}, 128, 96),
        ("hand_past_right_edge", {5: (100, 30), 6: (115, 40), 7: (126, 45)}, 128, 96),
        ("hand_past_bottom_left", {2: (20, 60), 3: (10, 80), 4: (3, 94)}, 128, 96),
        ("hand_beyond_image", {5: (120, 30), 6: (140, 30), 7: (170, 30)}, 128, 96),
        ("face_no_eyes_ears", {0: (60, 20), 1: (60, 30)}, 128, 96),
        ("face_no_nose", {14: (57, 17), 15: (63, 17)}, 128, 96),
        ("face_small", {0: (60, 20), 14: (57, 18)}, 128, 96),
        ("face_top_left", {0: (5, 4), 15: (12, 9), 17: (20, 6)}, 128, 96),
        ("face_bottom", {0: (64, 90), 14: (60, 86)}, 128, 96),
        ("face_exactly_20", {0: (50, 50), 14: (50, 50 + 10 / 3)}, 128, 96),
    ]
    for name, pts, w, h in fixed:
        cases.append((name, pts, w, h))
    for n in range(40):
        w, h = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        pts = {}
        for i in range(18):
            if rng.random() < 0.8:
                x = float(rng.uniform(-10, w + 10))
                y = float(rng.uniform(-10, h + 10))
                if rng.random() < 0.5:
                    x, y = float(round(x)), float(round(y))
                pts[i] = (x, y)
        # Keep arms plausible half of the time: wrist near the elbow near the shoulder.
        if n % 2 == 0:
            for s, e, wr in [(5, 6, 7), (2, 3, 4)]:
                if s in pts:
                    sx, sy = pts[s]
                    ex, ey = sx + float(rng.uniform(-30, 30)), sy + float(rng.uniform(-30, 30))
                    pts[e] = (ex, ey)
                    pts[wr] = (ex + float(rng.uniform(-30, 30)), ey + float(rng.uniform(-30, 30)))
            if 0 in pts:
                hx, hy = pts[0]
                for i in (14, 15, 16, 17):
                    if i in pts:
                        pts[i] = (hx + float(rng.uniform(-15, 15)), hy + float(rng.uniform(-15, 15)))
        cases.append((f"random_{n}", pts, w, h))
    out = []
    for name, pts, w, h in cases:
        body = body_of(pts)
        img = np.zeros((h, w, 3), np.uint8)
        hands = util.handDetect(body, img)
        face = util.faceDetect(body, img)
        out.append({
            "name": name, "width": w, "height": h,
            "keypoints": [[f64_bits(pts[i][0]), f64_bits(pts[i][1])] if i in pts else None
                          for i in range(18)],
            "hands": [[int(x), int(y), int(s), bool(left)] for x, y, s, left in hands],
            "face": None if face is None else [int(v) for v in face],
        })
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20261130)
    tensors = {}
    expected = {}

    rgb = np.array(Image.open(IMAGE).convert("RGB"))
    assert rgb.shape == (96, 128, 3)
    Image.fromarray(rgb).save(os.path.join(OUT, "image.png"))
    bgr = rgb[:, :, ::-1].copy()
    H, W = bgr.shape[:2]

    hand = load_hand()
    face = load_face()

    # 1. The networks on a small input.
    net_in = rgb[30:78, 40:80].copy()  # 48 x 40, stored as is; both sides read it as BGR
    Image.fromarray(net_in).save(os.path.join(OUT, "net_input.png"))
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(np.float32(net_in), (2, 0, 1))[None] / 256 - 0.5))
    with torch.no_grad():
        tensors["hand.out"] = hand.model(x).contiguous()
        tensors["face.out"] = face.model(x)[-1].contiguous()

    # 2. Boxes on hand-made bodies.
    expected["boxes"] = box_cases(rng)

    body = body_of(PERSON_A)
    face_b = body_of(FACE_B)
    det = OpenposeDetector(None, hand, face)

    # 3. detect_hands / detect_face on formula weights at small scales / input size.
    call_small, ns = _with_constant(Hand.__call__, "scale_search = [0.5, 1.0, 1.5, 2.0]", "SCALES", hand_mod)
    ns["SCALES"] = FORMULA_SCALES
    cap = Capture()
    ns["gaussian_filter"] = cap
    orig_call = Hand.__call__
    Hand.__call__ = call_small
    hand.model = Recorder(hand.model)
    left, right = det.detect_hands(body, bgr)
    Hand.__call__ = orig_call
    # The left hand's network inputs (as the padded BGR uint8 image) and outputs, per scale.
    for i, (x_in, y_out) in enumerate(hand.model.calls[:len(FORMULA_SCALES)]):
        u8 = (x_in[0].permute(1, 2, 0).numpy() + 0.5) * 256
        assert (u8 == np.round(u8)).all()
        Image.fromarray(u8.astype(np.uint8)).save(os.path.join(OUT, f"formula_left_in{i}.png"))
        tensors[f"formula.left.out{i}"] = y_out.contiguous()
    hand.model = hand.model.net
    # The left hand's maps come first (handDetect lists the left box first).
    tensors["formula.left.p0"] = torch.from_numpy(cap.maps[0])
    expected["formula_hands"] = {"scales": FORMULA_SCALES, "left": keypoints_json(left),
                                 "right": keypoints_json(right)}

    face_small, fns = _with_constant(Face.__call__, "w_size = 384", "WSIZE", face_mod)
    fns["WSIZE"] = FORMULA_FACE_SIZE
    orig_face_call = Face.__call__
    Face.__call__ = face_small
    x0, y0, w0 = util.faceDetect(body, bgr)
    heat_a = face(bgr[y0:y0 + w0, x0:x0 + w0, :])
    tensors["formula.face_a"] = torch.from_numpy(np.ascontiguousarray(heat_a))
    face_a = det.detect_face(body, bgr)
    face_b_res = det.detect_face(face_b, bgr)
    Face.__call__ = orig_face_call
    expected["formula_face"] = {"input_size": FORMULA_FACE_SIZE, "a": keypoints_json(face_a),
                                "b": keypoints_json(face_b_res),
                                "a_peaks": face.compute_peaks_from_heatmaps(heat_a).tolist()}

    # 4. The stub network at the real constants.
    stub_hand = Hand.__new__(Hand)
    stub_hand.model = StubNet(22).eval()
    stub_face = Face.__new__(Face)
    stub_face.model = StubNet(71).eval()
    stub_det = OpenposeDetector(None, stub_hand, stub_face)
    cap = Capture()
    hand_mod.gaussian_filter, orig_gf = cap, hand_mod.gaussian_filter
    s_left, s_right = stub_det.detect_hands(body, bgr)
    hand_mod.gaussian_filter = orig_gf
    for k in STUB_PARTS:
        tensors[f"stub.left.p{k}"] = torch.from_numpy(cap.maps[k])
    s_face_a = stub_det.detect_face(body, bgr)
    s_face_b = stub_det.detect_face(face_b, bgr)
    expected["stub"] = {"left": keypoints_json(s_left), "right": keypoints_json(s_right),
                        "face_a": keypoints_json(s_face_a), "face_b": keypoints_json(s_face_b)}

    # 5. The host-side numerics on their own.
    g = rng.standard_normal((40, 30)) * 0.1
    tensors["gauss.in"] = torch.from_numpy(g)
    tensors["gauss.out"] = torch.from_numpy(scipy.ndimage.gaussian_filter(g, sigma=3))
    tensors["gauss.kernel"] = torch.from_numpy(
        scipy.ndimage._filters._gaussian_kernel1d(3.0, 0, 12).copy())
    resize_cases = {
        "lanczos.up8": ((6, 5), (40, 48), cv2.INTER_LANCZOS4),
        "lanczos.up": ((23, 21), (128, 128), cv2.INTER_LANCZOS4),
        "area.generic": ((92, 46), (64, 32), cv2.INTER_AREA),
        "area.int23": ((69, 46), (3, 2), cv2.INTER_AREA),
    }
    for name, ((h, w), (dh, dw), interp) in resize_cases.items():
        a = (rng.standard_normal((h, w)) * 2).astype(np.float32)
        tensors[f"{name}.in"] = torch.from_numpy(a)
        tensors[f"{name}.out"] = torch.from_numpy(cv2.resize(a, (dw, dh), interpolation=interp))

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "maps.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(json.dumps({k: v for k, v in expected.items() if k != "boxes"}, indent=None)[:3000])
    print(f"{total} bytes in {OUT}")
    assert total <= BUDGET, total


if __name__ == "__main__":
    main()
