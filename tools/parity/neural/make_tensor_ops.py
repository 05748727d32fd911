"""Fixtures for crates/neural-annotators/tests/tensor_ops.rs: torch's resizes, adaptive pooling and
padding on small inputs, for the ops in crates/neural-annotators/src/tensor_ops.rs.

Writes crates/neural-annotators/tests/fixtures/tensor_ops/cases.safetensors and cases.json:
for each case, `<name>.in` (float32 NCHW) and `<name>.out` (torch's result), and in the JSON the
op and its arguments. Inputs are formula values (formula.py), so nothing random is involved.

Run from the repository root:  /work/pyenv/bin/python tools/parity/neural/make_tensor_ops.py
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formula  # noqa: E402

OUT = os.path.join("crates", "neural-annotators", "tests", "fixtures", "tensor_ops")
BUDGET = 250 * 1024
torch.set_num_threads(1)


def x(name, shape):
    return torch.from_numpy(formula.values(name, shape).reshape(shape) * 4.0)


def main():
    os.makedirs(OUT, exist_ok=True)
    cases, tensors = [], {}

    def add(name, op, inp, out, **args):
        cases.append({"name": name, "op": op, **args})
        tensors[f"{name}.in"] = inp.clone().contiguous()
        tensors[f"{name}.out"] = out.contiguous()

    # Shapes: up and down, odd sizes, non-square; the DINOv2 / DPT position-embedding cases.
    for i, (shape, size) in enumerate([((1, 3, 5, 7), (9, 13)), ((2, 2, 12, 10), (5, 7)),
                                       ((1, 1, 24, 24), (37, 26)), ((1, 2, 1, 6), (3, 4))]):
        inp = x(f"resize{i}", shape)
        for ac in (False, True):
            for mode in ("bilinear", "bicubic"):
                out = F.interpolate(inp, size=size, mode=mode, align_corners=ac)
                add(f"{mode}_size{i}_{int(ac)}", mode, inp, out, size=list(size), align_corners=ac)
    for i, (shape, scale) in enumerate([((1, 3, 5, 7), (2.0, 2.0)), ((1, 1, 37, 37), (0.7027, 1.3243)),
                                        ((1, 1, 12, 10), (4.6, 3.1)), ((1, 1, 8, 6), (0.5, 0.5))]):
        inp = x(f"scale{i}", shape)
        for ac in (False, True):
            for mode in ("bilinear", "bicubic"):
                out = F.interpolate(inp, scale_factor=scale, mode=mode, align_corners=ac)
                add(f"{mode}_scale{i}_{int(ac)}", mode + "_scale", inp, out, scale=list(scale), align_corners=ac)
    for i, (shape, size) in enumerate([((1, 3, 7, 9), (1, 1)), ((1, 3, 7, 9), (2, 2)), ((2, 2, 13, 11), (3, 3)),
                                       ((1, 2, 16, 24), (6, 6)), ((1, 1, 5, 5), (6, 7))]):
        inp = x(f"pool{i}", shape)
        add(f"adaptive{i}", "adaptive_avg_pool2d", inp, F.adaptive_avg_pool2d(inp, size), size=list(size))
    for i, pad in enumerate([(1, 1, 1, 1), (2, 0, 3, 1), (0, 4, 0, 2)]):
        inp = x(f"pad{i}", (1, 2, 5, 6))
        add(f"reflect{i}", "reflect", inp, F.pad(inp, pad, mode="reflect"), pad=list(pad))
        add(f"replicate{i}", "replicate", inp, F.pad(inp, pad, mode="replicate"), pad=list(pad))

    save_file(tensors, os.path.join(OUT, "cases.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    assert size <= BUDGET, f"fixtures {size} bytes over budget {BUDGET}"
    print(f"{len(cases)} cases, {size} bytes")


if __name__ == "__main__":
    main()
