#!/usr/bin/env python3
"""The real A1111 Python client (webuiapi, pinned in tests/requirements-webuiapi.txt) against
controlnet-serve: starts the server binary (argv[1] or $CNS_BIN, default
target/debug/controlnet-serve) with the embedded tiny model on an ephemeral port, drives it
through webuiapi, stops it with SIGTERM and checks it exits 0. Exits non-zero on any failure.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

import webuiapi
from PIL import Image, ImageDraw


def start_server(binary):
    proc = subprocess.Popen(
        [binary, "serve", "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )
    first = proc.stdout.readline().strip()
    prefix = "listening on http://"
    if not first.startswith(prefix):
        proc.kill()
        raise RuntimeError(f"unexpected first line {first!r}: {proc.stderr.read()[-2000:]}")
    # Keep draining both pipes so the server never blocks on a full one.
    logs = []
    for pipe in (proc.stdout, proc.stderr):
        threading.Thread(target=lambda p=pipe: logs.extend(p), daemon=True).start()
    host, port = first[len(prefix):].rsplit(":", 1)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=5) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("the server did not get ready:\n" + "".join(logs[-50:]))
        time.sleep(0.1)
    return proc, host, int(port), logs


def control_image():
    img = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(img)
    draw.rectangle([16, 16, 48, 48], outline="white", width=3)
    draw.line([0, 63, 63, 0], fill=(200, 120, 40), width=2)
    return img


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def run(api):
    image = control_image()

    # Listings.
    check(api.controlnet_version() == 3, "controlnet_version")
    models = api.controlnet_model_list()
    check(sorted(models) == ["canny", "depth", "openpose", "scribble"], f"model_list {models}")
    modules = api.controlnet_module_list()
    check("canny" in modules and "none" in modules, f"module_list {modules}")
    sd_models = api.get_sd_models()
    check([m["title"] for m in sd_models] == ["embedded"], f"sd-models {sd_models}")
    check(api.util_get_model_names() == ["embedded"], "util_get_model_names")
    check(api.util_get_current_model() == "embedded", "util_get_current_model")
    samplers = api.util_get_sampler_names()
    for name in ["DDIM", "DPM++ 2M", "DPM++ 2M Karras", "Euler", "Euler a", "UniPC"]:
        check(name in samplers, f"sampler {name} in {samplers}")
    api.util_wait_for_ready(check_interval=0.1)

    # txt2img with a ControlNet unit (canny); the detected map comes after the image.
    unit = webuiapi.ControlNetUnit(
        image=image, module="canny", model="canny", processor_res=64,
        threshold_a=50, threshold_b=150, weight=0.9,
    )
    r = api.txt2img(
        prompt="a red box", negative_prompt="blurry", seed=1234, steps=2, cfg_scale=6,
        width=64, height=72, sampler_name="DPM++ 2M", scheduler="Karras",
        controlnet_units=[unit],
    )
    check(len(r.images) == 2, f"txt2img images {len(r.images)}")
    check(r.images[0].size == (64, 72), f"txt2img size {r.images[0].size}")
    check(r.images[0].format == "PNG", f"txt2img format {r.images[0].format}")
    histogram = r.images[1].convert("L").histogram()
    check(all(n == 0 for n in histogram[1:255]), "the canny map is black and white")
    check(isinstance(r.info, dict), f"info parsed as JSON: {r.info!r}")
    check(r.info["seed"] == 1234 and r.info["all_seeds"] == [1234], f"seeds {r.info}")
    check(r.info["sampler_name"] == "DPM++ 2M Karras", f"sampler {r.info['sampler_name']}")
    check(r.info["scheduler"] == "dpmpp-2m-karras", f"scheduler {r.info['scheduler']}")
    check(r.parameters["prompt"] == "a red box", "parameters echoed")
    check(r.parameters["alwayson_scripts"]["ControlNet"]["args"][0]["model"] == "canny",
          "the unit echoed")
    check("ControlNet 0" in r.info["infotexts"][0], f"infotext {r.info['infotexts']}")

    # A batch: batch_size × n_iter images with consecutive seeds (no unit: a fresh client
    # call; webuiapi keeps units in a shared default dict, so pass an explicit one).
    r = api.txt2img(
        prompt="a cat", seed=50, steps=2, width=64, height=64, batch_size=2, n_iter=2,
        sampler_name="Euler", alwayson_scripts={},
    )
    check(len(r.images) == 4, f"batch images {len(r.images)}")
    check(r.info["all_seeds"] == [50, 51, 52, 53], f"batch seeds {r.info['all_seeds']}")

    # img2img with a mask.
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 31, 63], fill=255)
    r = api.img2img(
        images=[image], mask_image=mask, prompt="a dog", seed=7, steps=3, width=64, height=64,
        denoising_strength=0.6, sampler_name="Euler a", alwayson_scripts={},
    )
    check(len(r.images) == 1 and r.images[0].size == (64, 64), f"img2img {r.images}")
    check(r.info["all_seeds"] == [7], f"img2img seeds {r.info}")
    check(r.info["denoising_strength"] == 0.6, "img2img denoising_strength")

    # Detect, with webuiapi's own field names.
    r = api.controlnet_detect(images=[image], module="canny", processor_res=64,
                              threshold_a=100, threshold_b=200)
    check(len(r.images) == 1 and r.images[0].size == (64, 64), f"detect {r.images}")
    check(r.info == "Success", f"detect info {r.info!r}")

    # Errors come back as 4xx JSON naming the field.
    for kwargs, field in [
        (dict(sampler_name="LMS"), "sampler_name"),
        (dict(controlnet_units=[webuiapi.ControlNetUnit(image=image, module="canny",
                                                        model="control_v11p_sd15_lineart")]),
         "alwayson_scripts.ControlNet.args[0].model"),
        (dict(controlnet_units=[webuiapi.ControlNetUnit(image=image, module="nope",
                                                        model="canny")]),
         "alwayson_scripts.ControlNet.args[0].module"),
    ]:
        try:
            api.txt2img(prompt="x", steps=2, width=64, height=64, **kwargs)
        except RuntimeError as e:
            status, text = e.args
            body = json.loads(text)
            check(400 <= status < 500 and body["field"] == field, f"{kwargs}: {status} {text}")
        else:
            raise AssertionError(f"{kwargs} was accepted")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "CNS_BIN", "target/debug/controlnet-serve")
    proc, host, port, logs = start_server(binary)
    failed = False
    try:
        run(webuiapi.WebUIApi(host=host, port=port, steps=2))
    except Exception:
        traceback.print_exc()
        failed = True
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    if code != 0:
        print(f"the server exited with {code} after SIGTERM", file=sys.stderr)
        failed = True
    if failed:
        print("server log tail:\n" + "".join(logs[-40:]), file=sys.stderr)
        sys.exit(1)
    print("webuiapi against controlnet-serve: ok")


if __name__ == "__main__":
    main()
