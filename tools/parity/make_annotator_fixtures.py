"""Fixtures for crates/annotators: OpenCV's output for the weight-free preprocessors.

Writes small PNG inputs and what the reference (OpenCV as controlnet_aux / the A1111 ControlNet
extension call it) makes of them under crates/annotators/tests/fixtures/, plus manifest.json
listing the cases. Nothing is downloaded; the inputs are synthesised from a fixed numpy seed.
Run from the repository root with the venv's python:

    /work/pyenv/bin/python tools/parity/make_annotator_fixtures.py

The reference steps are written out here (they are a handful of cv2 calls each) rather than
imported from controlnet_aux, to keep the environment small:
  resize_image  controlnet_aux.util.resize_image: k = res / min(H, W); H, W = round(H*k / 64)*64
                (numpy round, ties to even); INTER_LANCZOS4 if k > 1 else INTER_AREA
  canny         cv2.Canny(img, low, high) on the RGB image (aperture 3, L1 gradient)
  scribble_xdog sd-webui-controlnet scribble_xdog on an already resized image
  lineart_std   controlnet_aux LineartStandardDetector (sigma 6, threshold 8) before its final
                resize back to the input size
  tile_resample sd-webui-controlnet tile_resample: INTER_AREA to int(H / rate), int(W / rate)
"""

import json
import os

import cv2
import numpy as np

OUT = os.path.join("crates", "annotators", "tests", "fixtures")
BUDGET = 300 * 1024

cv2.setNumThreads(1)


def photo_like(h, w, seed):
    """Gradient + soft blobs + a few hard shapes + Gaussian noise, RGB uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 40 + 150 * xx / w
    img[..., 1] = 60 + 120 * yy / h
    img[..., 2] = 120 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    for _ in range(5):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(6, 20)
        amp = rng.uniform(-90, 90, size=3)
        img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
    img[h // 4 : h // 2, w // 5 : w // 2] += (70, -50, 30)
    disk = (yy - 0.7 * h) ** 2 + (xx - 0.7 * w) ** 2 < (0.15 * min(h, w)) ** 2
    img[disk] = (230, 220, 40)
    img += rng.normal(0, 7, size=img.shape)
    return img.clip(0, 255).astype(np.uint8)


def shapes(h, w):
    """Flat regions with straight, diagonal and curved edges: hysteresis and NMS directions."""
    img = np.full((h, w, 3), 30, np.uint8)
    cv2.rectangle(img, (8, 8), (w // 2, h // 2), (200, 60, 60), -1)
    cv2.circle(img, (int(w * 0.65), int(h * 0.6)), min(h, w) // 4, (60, 190, 90), -1)
    cv2.line(img, (0, h - 1), (w - 1, h // 3), (240, 240, 240), 2)
    cv2.line(img, (w // 3, 0), (w // 2, h - 1), (90, 90, 250), 1)
    pts = np.array([[w - 20, 5], [w - 5, 25], [w - 30, 28]], np.int32)
    cv2.fillPoly(img, [pts], (180, 180, 20))
    # a weak step: only the low threshold sees it, unless it touches a strong edge
    img[h - 12 :, : w // 2] += 12
    return img


def resize_image(img, res):
    H, W = img.shape[:2]
    H, W = float(H), float(W)
    k = float(res) / min(H, W)
    H *= k
    W *= k
    H = int(np.round(H / 64.0)) * 64
    W = int(np.round(W / 64.0)) * 64
    return cv2.resize(img, (W, H), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def xdog(img, thr):
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(img, dtype=np.uint8)
    out[2 * (255 - dog) > thr] = 255
    return out


def lineart_standard(img, sigma=6.0, thr=8):
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), sigma)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    sel = intensity[intensity > thr]
    med = np.median(sel) if sel.size else float("nan")
    intensity /= max(16, med)
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


def tile_resample(img, rate):
    H, W = img.shape[:2]
    return cv2.resize(img, (int(float(W) / rate), int(float(H) / rate)), interpolation=cv2.INTER_AREA)


def save(name, arr):
    path = os.path.join(OUT, name)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok = cv2.imwrite(path, arr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok, path
    return name


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith(".png") or f == "manifest.json":
            os.remove(os.path.join(OUT, f))

    inputs = {
        "photo_96x128": photo_like(96, 128, 1),
        "shapes_64x80": shapes(64, 80),
        "photo_48x64": photo_like(48, 64, 2),
        "photo_128x128": photo_like(128, 128, 3),
    }
    manifest = {"opencv": cv2.__version__, "numpy": np.__version__, "inputs": {}, "cases": []}
    for name, img in inputs.items():
        manifest["inputs"][name] = save(f"in_{name}.png", img)

    # canny on the images as they are (the detect-resolution image), several threshold pairs
    for name in ["photo_96x128", "shapes_64x80", "photo_48x64"]:
        for low, high in [(100, 200), (50, 100), (20, 60), (150, 90)]:
            out = cv2.Canny(inputs[name], low, high)
            manifest["cases"].append({
                "op": "canny", "input": name, "low": low, "high": high,
                "output": save(f"canny_{name}_{low}_{high}.png", out),
            })

    # resize_image: non-integer INTER_AREA, 2x INTER_AREA (OpenCV's fast path), INTER_LANCZOS4
    # and INTER_AREA enlarging one axis (96 -> 128: k = 1 but 96/64 rounds up to 2)
    cases = [("photo_96x128", 64), ("photo_128x128", 64), ("photo_48x64", 64), ("shapes_64x80", 96),
             ("photo_96x128", 96), ("shapes_64x80", 64)]
    for name, res in cases:
        out = resize_image(inputs[name], res)
        manifest["cases"].append({
            "op": "resize_image", "input": name, "resolution": res,
            "output": save(f"resize_{name}_{res}.png", out),
        })
        # and the whole canny preprocessor: HWC3 -> resize_image -> Canny
        can = cv2.Canny(out, 100, 200)
        manifest["cases"].append({
            "op": "canny_pipeline", "input": name, "resolution": res, "low": 100, "high": 200,
            "output": save(f"canny_pipeline_{name}_{res}.png", can),
        })

    for name, thrs in [("photo_96x128", [8, 2]), ("shapes_64x80", [32, 8])]:
        for thr in thrs:
            out = xdog(inputs[name], thr)[..., 0]
            manifest["cases"].append({
                "op": "scribble_xdog", "input": name, "threshold": thr,
                "output": save(f"xdog_{name}_{thr}.png", out),
            })
        out = lineart_standard(inputs[name])
        manifest["cases"].append({
            "op": "lineart_standard", "input": name,
            "output": save(f"lineart_standard_{name}.png", out),
        })

    for rate in [2.0, 3.3]:
        out = tile_resample(inputs["photo_96x128"], rate)
        manifest["cases"].append({
            "op": "tile_resample", "input": "photo_96x128", "rate": rate,
            "output": save(f"tile_photo_96x128_{rate}.png", out),
        })

    # shuffle minus the RNG: controlnet_aux make_noise_disk from given uniform grids (f = 16 so
    # the grid is more than a few cells), then cv2.remap(img, flow, None, INTER_LINEAR)
    img = inputs["photo_48x64"]
    H, W = img.shape[:2]
    f = 16
    rng = np.random.default_rng(4)
    grids = [rng.uniform(0, 1, size=(H // f + 2, W // f + 2)) for _ in range(2)]

    def disk(grid):
        noise = cv2.resize(grid, (W + 2 * f, H + 2 * f), interpolation=cv2.INTER_CUBIC)
        noise = noise[f : f + H, f : f + W]
        noise -= np.min(noise)
        noise /= np.max(noise)
        return noise[:, :, None]

    flow = np.concatenate([disk(grids[0]) * float(W - 1), disk(grids[1]) * float(H - 1)], axis=2)
    out = cv2.remap(img, flow.astype(np.float32), None, cv2.INTER_LINEAR)
    manifest["cases"].append({
        "op": "shuffle_from_grid", "input": "photo_48x64", "f": f,
        "grid_x": grids[0].tolist(), "grid_y": grids[1].tolist(),
        "output": save("shuffle_photo_48x64.png", out),
    })

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(manifest['cases'])} cases, {total} bytes")
    assert total < BUDGET, f"fixtures {total} bytes > budget {BUDGET}"


if __name__ == "__main__":
    main()
