"""Schemathesis hooks for tools/api-fuzz/run.sh: fill in what JSON Schema cannot say.

A schema can say that an image field is a non-empty base64 string, not that it decodes to a
PNG; that an adapter name matches a pattern, not that the adapter is loaded; it cannot compare
two fields (`end` >= `start`). Before each call, in cases schemathesis generated as valid, this
puts a real 64x64 PNG in every image field, a real pose in every pose field, a loaded adapter's
name in every adapter/model field, and orders start/end pairs. Invalid cases are sent as generated. Schemathesis checks
again that the case is still valid by the schema after the hook ran.
"""

import base64
import json
import re
import struct
import sys
import urllib.request
import zlib

import schemathesis
from schemathesis import GenerationMode


def _png(width: int = 64, height: int = 64) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 4 % 256, y * 4 % 256, 90)) for x in range(width))
        for y in range(height)
    )
    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows))
    png += chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


PNG = _png()
# A real pose (OpenPose JSON, as /v1/detect answers it): the schema can say a pose is an object,
# not that it holds 18 body points.
POSE = {
    "people": [{"pose_keypoints_2d": [0.5, 0.2, 1.0, 0.5, 0.4, 1.0] + [0.0] * 48}],
    "canvas_width": 64,
    "canvas_height": 64,
}

# Hypothesis describes deeply nested strategies (free-form JSON in fields the API ignores) by
# recursion; CPython 3.11's parser can fail at the default limit ("AST constructor recursion
# depth mismatch").
sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
CONTROLNET = re.compile(r"^controlnet$", re.IGNORECASE)


def _adapter(base_url: str) -> str:
    """A loaded adapter's name; loads one (`embedded:1`) when none is (the fuzz may delete)."""
    with urllib.request.urlopen(f"{base_url}/v1/adapters", timeout=10) as r:
        names = [a["name"] for a in json.load(r)]
    if names:
        return names[0]
    req = urllib.request.Request(
        f"{base_url}/v1/adapters/fuzz",
        data=json.dumps({"path": "embedded:1"}).encode(),
        headers={"content-type": "application/json"},
        method="PUT",
    )
    urllib.request.urlopen(req, timeout=60).read()
    return "fuzz"


def _order(d: dict, start: str, end: str) -> None:
    a, b = d.get(start), d.get(end, 1.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
        d[start], d[end] = b, a


def _enough_strength(body: dict, key: str) -> None:
    """img2img runs int(steps × strength) steps: at least one (the schema cannot multiply).
    Without `steps`, the default may be as low as 1; without a strength, it is 0.75."""
    steps, strength = body.get("steps", 1), body.get(key, 0.75)
    if isinstance(steps, (int, float)) and isinstance(strength, (int, float)) and int(steps * strength) < 1:
        body[key] = 1.0


def _unit_used(unit: dict) -> bool:
    model = unit.get("model")
    return unit.get("enabled", True) is not False and isinstance(model, str) and model.strip() not in ("", "None", "none")


@schemathesis.hook
def before_call(context, case, kwargs):
    meta = case.meta
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE or not isinstance(case.body, dict):
        return
    body = case.body
    path = case.operation.path
    base_url = (case.operation.base_url or "").rstrip("/")
    if path in ("/v1/generate", "/v1/generate/stream"):
        for key in ("init_image", "mask"):
            if isinstance(body.get(key), str):
                body[key] = PNG
        if isinstance(body.get("init_image"), str):
            _enough_strength(body, "strength")
        controls = [c for c in body.get("controls") or [] if isinstance(c, dict)]
        if controls:
            name = _adapter(base_url)
            for c in controls:
                c["adapter"] = name
                if isinstance(c.get("pose"), dict):
                    c["pose"] = POSE
                else:
                    c["image"] = PNG
                _order(c, "start", "end")
    elif path == "/v1/detect":
        body["image"] = PNG
    elif path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        images = body.get("init_images")
        if isinstance(images, list) and images:
            images[0] = PNG
            if path == "/sdapi/v1/img2img":
                _enough_strength(body, "denoising_strength")
        if isinstance(body.get("mask"), str) and body["mask"]:
            body["mask"] = PNG
        scripts = body.get("alwayson_scripts")
        units = []
        if isinstance(scripts, dict):
            for key, script in scripts.items():
                if CONTROLNET.match(key) and isinstance(script, dict) and isinstance(script.get("args"), list):
                    units += [u for u in script["args"] if isinstance(u, dict) and _unit_used(u)]
        if units:
            name = _adapter(base_url)
            for u in units:
                u["model"] = name
                u["image"] = PNG
                _order(u, "guidance_start", "guidance_end")
    elif path == "/controlnet/detect":
        for key in ("controlnet_input_images", "controlnet_images"):
            if isinstance(body.get(key), list):
                body[key] = [PNG for _ in body[key]]
