"""Parity fixtures for the OpenPose drawing and keypoint JSON.

Rust side: crates/annotators/src/draw_cv.rs (OpenCV primitives) and
crates/neural-annotators/src/openpose/{draw,pose_json}.rs.

References:
* OpenCV 4.x through cv2 (`ellipse2Poly`, `fillConvexPoly`, `circle`, `line`);
* controlnet_aux 0.0.10 `open_pose.draw_poses` / `util.draw_bodypose|draw_handpose|draw_facepose`
  (needs matplotlib: `draw_handpose` colours its edges with `matplotlib.colors.hsv_to_rgb`);
* A1111's sd-webui-controlnet v1.1.455 `annotator/openpose` (`util.py` drawing,
  `encode_poses_as_json`). That package cannot be imported outside the WebUI, so the two ways its
  drawing differs from controlnet_aux's (per-part `is_normalized`: a part whose present points are
  not all within [-1, 1] is drawn in pixels; absent (`None`) hand / face points are skipped) are
  applied below by `a1111_draw_poses`, which calls controlnet_aux's own functions where the two
  agree and is checked to equal controlnet_aux's `draw_poses` on every normalised case; its JSON
  layout is written by `a1111_encode` from the documented function.

Writes
* crates/annotators/tests/fixtures/draw_cv/
  - cases.json: `ellipse2poly` (arguments and cv2's points), `fill` (polygons), `circle`,
    `line` cases, canvas size
  - fill.png, circle.png, line.png: each case's drawing on its own black canvas, stacked
    vertically in case order
* crates/neural-annotators/tests/fixtures/openpose_draw/
  - poses.json: the pose cases (coordinates as IEEE-754 bit patterns, `null` for absent
    keypoints), canvas sizes, draw flags, which reference drew them; `hand_colors` (bits of
    hsv_to_rgb * 255); `pow` (numpy scalar `**` results, bits); `json` cases (poses with short
    dyadic coordinates and A1111's encoding)
  - <case>.png: the canvases

Deterministic (fixed seeds). Run: /work/pyenv/bin/python tools/parity/neural/make_openpose_draw.py
"""
import json
import math
import os
import struct
import warnings

warnings.filterwarnings("ignore")

import cv2
import numpy as np
import matplotlib

from controlnet_aux.open_pose import PoseResult, draw_poses
from controlnet_aux.open_pose import util
from controlnet_aux.open_pose.body import BodyResult, Keypoint

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
OUT_CV = os.path.join(ROOT, "crates/annotators/tests/fixtures/draw_cv")
OUT_POSE = os.path.join(ROOT, "crates/neural-annotators/tests/fixtures/openpose_draw")
os.makedirs(OUT_CV, exist_ok=True)
os.makedirs(OUT_POSE, exist_ok=True)

cv2.setNumThreads(1)


def bits(x):
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def save_rgb(path, img):
    cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


# ---------------------------------------------------------------- OpenCV primitives
CW, CH = 40, 32
rng = np.random.default_rng(1234)
cases = {"canvas": [CW, CH], "ellipse2poly": [], "fill": [], "circle": [], "line": []}

ell_args = []
for _ in range(160):
    c = (int(rng.integers(-20, 61)), int(rng.integers(-20, 53)))
    a = (int(rng.integers(0, 41)), int(rng.integers(0, 11)))
    ell_args.append((c, a, int(rng.integers(-180, 181)), 0, 360, 1))
for ang in (-180, -135, -90, -45, -1, 0, 1, 44, 45, 90, 135, 179, 180, 400, -400, 720, -720):
    ell_args.append(((20, 16), (13, 4), ang, 0, 360, 1))
for ax in ((0, 4), (1, 4), (0, 0), (1, 0), (2, 1), (4, 4), (100, 4)):
    ell_args.append(((20, 16), ax, 30, 0, 360, 1))
for arc in ((30, 100, 5), (100, 30, 7), (-90, 45, 10), (300, 400, 3), (0, 720, 30),
            (10, 730, 1), (-400, -300, 4), (45, 45, 1), (0, 360, 90), (0, 360, 180)):
    ell_args.append(((20, 16), (15, 9), 20, arc[0], arc[1], arc[2]))
for args in ell_args:
    pts = cv2.ellipse2Poly(*args)
    cases["ellipse2poly"].append({
        "center": list(args[0]), "axes": list(args[1]), "angle": args[2],
        "arc_start": args[3], "arc_end": args[4], "delta": args[5],
        "pts": pts.reshape(-1, 2).tolist(),
    })

FILL = (200, 120, 40)
fills = []
for args in ell_args[:140]:
    fills.append(cv2.ellipse2Poly(*args).reshape(-1, 2).tolist())
for _ in range(60):
    n = int(rng.integers(3, 7))
    fills.append(rng.integers(-15, 56, size=(n, 2)).tolist())
fills += [
    [[5, 5]], [[3, 4], [30, 20]], [[7, 7], [7, 7], [7, 7]], [[2, 10], [35, 10], [20, 10]],
    [[12, 1], [12, 30], [12, 15]], [[-5, -100000], [30, 20], [10, 40]],
    [[-1000000, 5], [1000000, 9], [20, 1000000]], [[0, 0], [39, 0], [39, 31], [0, 31]],
    [[-10, -10], [-1, -10], [-1, -1]], [[40, 10], [60, 10], [50, 20]], [[10, 31], [20, 31], [15, 40]],
]
sheet = []
for pts in fills:
    img = np.zeros((CH, CW, 3), np.uint8)
    cv2.fillConvexPoly(img, np.array(pts, np.int32), FILL)
    sheet.append(img)
    cases["fill"].append({"pts": pts, "color": list(FILL)})
save_rgb(os.path.join(OUT_CV, "fill.png"), np.concatenate(sheet, 0))

sheet = []
for k in range(140):
    center = [int(rng.integers(-10, 51)), int(rng.integers(-10, 43))]
    radius = int(rng.integers(0, 9)) if k < 130 else int(rng.integers(15, 40))
    filled = bool(k % 3 != 0)
    color = [int(v) for v in rng.integers(1, 256, size=3)]
    img = np.zeros((CH, CW, 3), np.uint8)
    cv2.circle(img, tuple(center), radius, color, -1 if filled else 1)
    sheet.append(img)
    cases["circle"].append({"center": center, "radius": radius, "filled": filled, "color": color})
save_rgb(os.path.join(OUT_CV, "circle.png"), np.concatenate(sheet, 0))

sheet = []
line_args = []
for k in range(150):
    p0 = [int(rng.integers(-20, 61)), int(rng.integers(-20, 53))]
    p1 = [int(rng.integers(-20, 61)), int(rng.integers(-20, 53))]
    t = 2 if k < 100 else int(rng.integers(1, 8))
    line_args.append((p0, p1, t))
line_args += [([10, 10], [10, 10], 2), ([3, 7], [36, 7], 2), ([8, 2], [8, 29], 2), ([0, 0], [39, 31], 2),
              ([-100000, 12], [100000, 20], 2), ([5, -90000], [30, 90000], 3), ([-50, -50], [-3, -40], 2),
              ([20, 16], [21, 16], 2), ([20, 16], [20, 17], 2), ([20, 16], [21, 17], 2)]
for p0, p1, t in line_args:
    ie = len(cases["line"]) % 20
    color = (matplotlib.colors.hsv_to_rgb([ie / 20.0, 1.0, 1.0]) * 255).tolist()
    img = np.zeros((CH, CW, 3), np.uint8)
    cv2.line(img, tuple(p0), tuple(p1), color, thickness=t)
    sheet.append(img)
    cases["line"].append({"p0": p0, "p1": p1, "thickness": t, "color_bits": [bits(c) for c in color]})
save_rgb(os.path.join(OUT_CV, "line.png"), np.concatenate(sheet, 0))

with open(os.path.join(OUT_CV, "cases.json"), "w") as f:
    json.dump(cases, f, separators=(",", ":"))


# ---------------------------------------------------------------- poses
def a1111_is_normalized(keypoints):
    pts = [0 <= abs(k.x) <= 1 and 0 <= abs(k.y) <= 1 for k in keypoints if k is not None]
    return bool(pts) and all(pts)


def a1111_draw_poses(poses, H, W, draw_body=True, draw_hand=True, draw_face=True):
    """sd-webui-controlnet v1.1.455's draw_poses: controlnet_aux's drawing applied to each part
    with the part's present keypoints, pixel coordinates brought to [0, 1] only when needed."""
    canvas = np.zeros((H, W, 3), np.uint8)
    for pose in poses:
        if draw_body:
            kps = pose.body.keypoints
            if a1111_is_normalized(kps):
                util.draw_bodypose(canvas, kps)
            else:
                _body_pixels(canvas, kps)
        for part, on, fn in ((pose.left_hand, draw_hand, "hand"), (pose.right_hand, draw_hand, "hand"),
                             (pose.face, draw_face, "face")):
            if not on or not part:
                continue
            if a1111_is_normalized(part):
                if all(k is not None for k in part):
                    (util.draw_handpose if fn == "hand" else util.draw_facepose)(canvas, part)
                else:
                    _part_scaled(canvas, part, fn, W, H)
            else:
                _part_scaled(canvas, part, fn, 1.0, 1.0)
    return canvas


def _body_pixels(canvas, keypoints):
    # util.draw_bodypose with H, W = 1.0, 1.0 (A1111's non-normalised branch).
    stickwidth = 4
    limbSeq = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
               [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]
    colors = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
              [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
              [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
    H, W = 1.0, 1.0
    for (k1_index, k2_index), color in zip(limbSeq, colors):
        keypoint1 = keypoints[k1_index - 1]
        keypoint2 = keypoints[k2_index - 1]
        if keypoint1 is None or keypoint2 is None:
            continue
        Y = np.array([keypoint1.x, keypoint2.x]) * float(W)
        X = np.array([keypoint1.y, keypoint2.y]) * float(H)
        mX = np.mean(X)
        mY = np.mean(Y)
        length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
        polygon = cv2.ellipse2Poly((int(mY), int(mX)), (int(length / 2), stickwidth), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for keypoint, color in zip(keypoints, colors):
        if keypoint is None:
            continue
        x, y = int(keypoint.x * W), int(keypoint.y * H)
        cv2.circle(canvas, (int(x), int(y)), 4, color, thickness=-1)


def _part_scaled(canvas, keypoints, fn, W, H):
    # util.draw_handpose / draw_facepose with A1111's None checks and the given W, H.
    eps = 0.01
    if fn == "hand":
        edges = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10],
                 [10, 11], [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]
        for ie, (e1, e2) in enumerate(edges):
            k1, k2 = keypoints[e1], keypoints[e2]
            if k1 is None or k2 is None:
                continue
            x1, y1, x2, y2 = int(k1.x * W), int(k1.y * H), int(k2.x * W), int(k2.y * H)
            if x1 > eps and y1 > eps and x2 > eps and y2 > eps:
                cv2.line(canvas, (x1, y1), (x2, y2),
                         matplotlib.colors.hsv_to_rgb([ie / float(len(edges)), 1.0, 1.0]) * 255, thickness=2)
    for k in keypoints:
        if k is None:
            continue
        x, y = int(k.x * W), int(k.y * H)
        if x > eps and y > eps:
            if fn == "hand":
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
            else:
                cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


def a1111_encode(poses, H, W):
    def compress(kps):
        if not kps:
            return None
        return [v for k in kps for v in ([float(k.x), float(k.y), 1.0] if k is not None else [0.0, 0.0, 0.0])]

    return {
        "people": [{
            "pose_keypoints_2d": compress(p.body.keypoints),
            "face_keypoints_2d": compress(p.face),
            "hand_left_keypoints_2d": compress(p.left_hand),
            "hand_right_keypoints_2d": compress(p.right_hand),
        } for p in poses],
        "animals": [],
        "canvas_height": H,
        "canvas_width": W,
    }


def kp_list(xy):
    return [None if p is None else Keypoint(float(p[0]), float(p[1])) for p in xy]


def rand_body(r, lo=0.03, hi=0.97, missing=0.0):
    return [None if r.random() < missing else (r.uniform(lo, hi), r.uniform(lo, hi)) for _ in range(18)]


def rand_hand(r, W, H, cx, cy, spread=0.12, missing=0.0):
    # Detector-style: a missing hand point is at (-1/W, -1/H).
    out = []
    for _ in range(21):
        if r.random() < missing:
            out.append((-1.0 / W, -1.0 / H))
        else:
            out.append((min(cx + r.uniform(-spread, spread), 1.0), min(cy + r.uniform(-spread, spread), 1.0)))
    return out


def rand_face(r, W, H, cx, cy, n=70):
    return [(min(cx + r.uniform(-0.08, 0.08), 1.0), min(cy + r.uniform(-0.08, 0.08), 1.0)) for _ in range(n)]


def person(body, left=None, right=None, face=None):
    return {"body": body, "left": left, "right": right, "face": face}


def to_pose(p):
    def part(v):
        if v is None:
            return None
        return kp_list(v)
    return PoseResult(BodyResult(kp_list(p["body"]), 0.0, 0), part(p["left"]), part(p["right"]), part(p["face"]))


def enc_points(v):
    if v is None:
        return None
    return [None if p is None else [bits(p[0]), bits(p[1])] for p in v]


pr = np.random.default_rng(99)
pose_cases = []


def add(name, H, W, people, flags=(True, True, True), ref="controlnet_aux"):
    pose_cases.append({"name": name, "H": H, "W": W, "people": people, "flags": list(flags), "ref": ref})


W, H = 200, 150
add("body_only", H, W, [person(rand_body(pr))], (True, False, False))
add("body_missing", H, W, [person(rand_body(pr, missing=0.35))], (True, False, False))
b = rand_body(pr)
add("with_hands", H, W, [person(b, rand_hand(pr, W, H, *b[7]), rand_hand(pr, W, H, *b[4], missing=0.3))])
b = rand_body(pr)
add("with_face", H, W, [person(b, face=rand_face(pr, W, H, *b[0]))])
people = []
for _ in range(3):
    b = rand_body(pr, missing=0.15)
    c7 = b[7] or (0.5, 0.5)
    c4 = b[4] or (0.4, 0.6)
    c0 = b[0] or (0.5, 0.3)
    people.append(person(b, rand_hand(pr, W, H, *c7, missing=0.2), rand_hand(pr, W, H, *c4), rand_face(pr, W, H, *c0, n=68)))
add("several_people", H, W, people)
add("several_people_faceonly", H, W, people, (False, False, True))
add("several_people_hand", H, W, people, (True, True, False))
# Border and truncation cases: exact edges, near-integer products, eps test of hands and faces.
bw = [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (3 / W, 7 / H), (1 / W, 1 / H),
      (0.999999, 0.000001), (-0.02, 0.5), (0.5, -0.03), (0.3333333333333333, 0.6666666666666666),
      (0.1, 0.7), (0.7, 0.1), (49 / W, 1 / H), (0.25, 0.25), (0.25, 0.2533), None, (0.6, 0.6)]
hand = [(0.0, 0.0), (1 / W, 1 / H), (2 / W, 2 / H), (0.005, 0.5), (0.5, 0.005), (1.0, 1.0), (0.999, 0.5),
        (0.5, 0.999), (-1 / W, -1 / H), (0.3, 0.3), (0.31, 0.3), (0.3, 0.31), (0.32, 0.32), (0.3, 0.3),
        (0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (0.51, 0.52), (0.52, 0.51), (0.2, 0.6), (0.6, 0.2)]
face = [(0.0, 0.0), (1 / W, 1 / H), (1.0, 1.0), (0.5, 0.995), (0.995, 0.5), (0.004, 0.3), (0.3, 0.004), (0.4, 0.4)]
add("border", H, W, [person(bw, hand, list(reversed(hand)), face)])
# Degenerate limbs: coincident and adjacent keypoints.
deg = [(0.5, 0.5)] * 4 + [(0.5 + 1 / W, 0.5), (0.5, 0.5 + 1 / H), (0.5 + 2 / W, 0.5 + 2 / H)] + [(0.2, 0.8)] * 11
add("degenerate", H, W, [person(deg)], (True, False, False))
# Many random people, coordinates in [-0.2, 1] (still normalised), odd canvas sizes.
for k, (hh, ww) in enumerate(((96, 128), (77, 101), (64, 64), (33, 250))):
    people = []
    for _ in range(4):
        b = rand_body(pr, -0.2, 1.0, missing=0.2)
        people.append(person(b, rand_hand(pr, ww, hh, pr.uniform(0, 1), pr.uniform(0, 1), 0.2, 0.1),
                             rand_hand(pr, ww, hh, pr.uniform(0, 1), pr.uniform(0, 1), 0.2),
                             rand_face(pr, ww, hh, pr.uniform(0, 1), pr.uniform(0, 1))))
    add(f"random_{k}", hh, ww, people)
add("empty", 40, 60, [])

# A1111 cases: pixel coordinates (pose editors) and absent hand / face points.
pix_b = [None if pr.random() < 0.1 else (float(pr.integers(0, W)), float(pr.integers(0, H))) for _ in range(18)]
pix_b[1] = (100.5, 75.25)
pix_h = [None if i in (3, 9) else (round(pr.uniform(20, 180), 2), round(pr.uniform(10, 140), 2)) for i in range(21)]
pix_f = [(float(pr.integers(0, W)), float(pr.integers(0, H))) for _ in range(70)]
norm_h = [None if i in (0, 5) else (pr.uniform(0.1, 0.9), pr.uniform(0.1, 0.9)) for i in range(21)]
add("a1111_pixels", H, W, [person(pix_b, pix_h, norm_h, pix_f)], ref="a1111")
add("a1111_mixed", H, W, [person(rand_body(pr), pix_h, None, rand_face(pr, W, H, 0.5, 0.5)),
                          person(pix_b, None, norm_h, None)], ref="a1111")
add("a1111_all_absent_hand", H, W, [person(rand_body(pr), [None] * 21, None, [None] * 5)], ref="a1111")

for case in pose_cases:
    poses = [to_pose(p) for p in case["people"]]
    flags = case["flags"]
    ours = a1111_draw_poses(poses, case["H"], case["W"], *flags)
    if case["ref"] == "controlnet_aux":
        ref = draw_poses(poses, case["H"], case["W"], *flags)
        assert np.array_equal(ref, ours), case["name"]  # A1111 == controlnet_aux here
    else:
        ref = ours
    save_rgb(os.path.join(OUT_POSE, f"{case['name']}.png"), ref)

# JSON cases with short dyadic coordinates (exactly parsed by any JSON reader).
jr = np.random.default_rng(5)


def dy(v):
    return round(v * 1024) / 1024


jb = [None if jr.random() < 0.2 else (dy(jr.uniform(0, 1)), dy(jr.uniform(0, 1))) for _ in range(18)]
jh = [(dy(jr.uniform(0, 1)), dy(jr.uniform(0, 1))) for _ in range(21)]
jf = [(dy(jr.uniform(0, 1)), dy(jr.uniform(0, 1))) for _ in range(70)]
json_cases = []
for name, H2, W2, people in (
    ("one", 512, 768, [person(jb)]),
    ("full", 480, 640, [person(jb, jh, list(reversed(jh)), jf), person([None] * 18)]),
    ("none", 64, 64, []),
):
    poses = [to_pose(p) for p in people]
    enc = a1111_encode(poses, H2, W2)
    json_cases.append({"name": name, "H": H2, "W": W2, "people": people, "text": json.dumps(enc, indent=4)})

for case in pose_cases:
    case["people"] = [{k: enc_points(v) for k, v in p.items()} for p in case["people"]]

hand_colors = [[bits(c) for c in matplotlib.colors.hsv_to_rgb([ie / 20.0, 1.0, 1.0]) * 255] for ie in range(20)]
pows = []
for v in np.random.default_rng(3).uniform(-600, 600, 1500):
    x = np.float64(v)
    s = np.float64(abs(v) * 3.7)
    pows.append([bits(x), bits(x ** 2), bits(s), bits(s ** 0.5)])

with open(os.path.join(OUT_POSE, "poses.json"), "w") as f:
    json.dump({"cases": pose_cases, "json_cases": [
        {**c, "people": [{k: enc_points(v) for k, v in p.items()} for p in c["people"]]} for c in json_cases
    ], "hand_colors": hand_colors, "pow": pows}, f, separators=(",", ":"))
print("ok", len(pose_cases), "pose cases")
