#!/usr/bin/env python3
"""Tiny torch pickles written by real torch, for the Rust torch-pickle reader
(crates/diffusion/src/torch_pickle.rs), and a checker for the files its writer makes.

Write mode (default), from the repository root:
    /work/pyenv/bin/python tools/parity/make_torch_pickle_fixtures.py

writes under crates/diffusion/tests/fixtures/torch_pickle/:
  zip_f32_plain.pth             zip format (torch.save default), a plain OrderedDict state dict:
                                f32 weights, views of one shared storage (a row at an offset, a
                                transposed view, a strided column), a 0-d int64 buffer
  legacy_f16_nested.pth         legacy format (_use_new_zipfile_serialization=False, what torch
                                < 1.6 wrote, as the OpenPose files): {'state_dict': {'module.'+k},
                                'epoch', 'optimizer', 'arch'}, f16 with views and shared storage,
                                an int64 buffer
  legacy_f32_plain.pth          legacy format, plain dict: f32, f64, int32, uint8 and views
  zip_bf16_model_state_dict.pt  zip, {'model': {'state_dict': ...}, 'step': 3}: bf16 and f64
  zip_f16_module.bin            zip, plain dict, every key under 'module.', f16
  expected.safetensors          for each file F and each tensor K the reader must resolve (no
                                prefix, no nesting): "F/K", contiguous, in the stored dtype
                                (uint8 stays uint8, int32 int32, ...)

Check mode:
    /work/pyenv/bin/python tools/parity/make_torch_pickle_fixtures.py --check DIR

loads every file that the Rust writer put in DIR (run
`TORCH_PICKLE_EXPORT=DIR cargo test -p diffusion --test torch_pickle`) with the real
`torch.load(weights_only=True)` and compares it with the JSON description next to it: nesting,
key prefix, storage dtype, shapes and values (the expected f32 values rounded to the stored
dtype by torch). Exits non-zero on any difference.
"""

import json
import sys
from collections import OrderedDict
from pathlib import Path

import safetensors.torch
import torch

OUT = Path("crates/diffusion/tests/fixtures/torch_pickle")
BUDGET = 100 * 1024


def exact(shape, seed, scale=1.0 / 64):
    """Values exactly representable in f16 and bf16 (multiples of 1/64 under 2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-100, 100, shape, generator=g).to(torch.float32) * scale


def views_of(base, prefix):
    """Views of one storage: the base, a row at an offset, its transpose, a strided column."""
    return {
        f"{prefix}.base": base,
        f"{prefix}.row": base[3],
        f"{prefix}.t": base.t(),
        f"{prefix}.col": base[1:, 2],
    }


def fixtures():
    files = {}

    sd = OrderedDict()
    sd["conv.weight"] = exact((4, 3, 3, 3), 1)
    sd["conv.bias"] = exact((4,), 2)
    sd.update(views_of(exact((6, 5), 3), "shared"))
    sd["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    files["zip_f32_plain.pth"] = (sd, sd, True)

    inner = OrderedDict()
    inner["body.conv1.weight"] = exact((3, 2, 3, 3), 4).half()
    inner["body.conv1.bias"] = exact((3,), 5).half()
    inner.update(views_of(exact((5, 4), 6).half(), "pair"))
    inner["bn.running_var"] = exact((3,), 7).abs().half()
    inner["bn.num_batches_tracked"] = torch.tensor([123456789012], dtype=torch.int64)
    obj = {
        "epoch": 12,
        "arch": "net",
        "state_dict": OrderedDict(("module." + k, v) for k, v in inner.items()),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    }
    files["legacy_f16_nested.pth"] = (obj, inner, False)

    sd = OrderedDict()
    sd["model0.conv1_1.weight"] = exact((2, 3, 3, 3), 8)
    sd["model0.conv1_1.bias"] = exact((2,), 9)
    sd["f64"] = exact((2, 3), 10).double()
    sd["i32"] = torch.arange(-3, 3, dtype=torch.int32).reshape(2, 3)
    sd["u8"] = torch.arange(250, 256, dtype=torch.uint8)
    sd.update(views_of(exact((4, 3), 11), "v"))
    files["legacy_f32_plain.pth"] = (sd, sd, False)

    inner = OrderedDict()
    inner["enc.weight"] = exact((3, 4), 12).bfloat16()
    inner.update(views_of(exact((4, 4), 13).bfloat16(), "b"))
    inner["scale"] = exact((2, 2), 14).double()
    obj = {"model": {"state_dict": inner}, "step": 3}
    files["zip_bf16_model_state_dict.pt"] = (obj, inner, True)

    sd = OrderedDict()
    sd["head.weight"] = exact((2, 3), 15).half()
    sd["head.bias"] = exact((2,), 16).half()
    sd["emb"] = exact((3, 2), 17).half().t()
    obj = OrderedDict(("module." + k, v) for k, v in sd.items())
    files["zip_f16_module.bin"] = (obj, sd, True)
    return files


def write():
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (obj, resolved, use_zip) in fixtures().items():
        path = OUT / name
        torch.save(obj, path, _use_new_zipfile_serialization=use_zip)
        # Real torch reads it back, also in its restricted mode.
        back = torch.load(path, weights_only=True)
        assert type(back) is type(obj), name
        for key, t in resolved.items():
            expected[f"{name}/{key}"] = t.contiguous().clone()
    safetensors.torch.save_file(expected, OUT / "expected.safetensors")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    for p in sorted(OUT.iterdir()):
        print(f"{p.stat().st_size:8d}  {p}")
    assert total < BUDGET, f"fixtures take {total} bytes, budget {BUDGET}"
    print(f"total {total} bytes")


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def check(folder):
    folder = Path(folder)
    descs = sorted(folder.glob("*.json"))
    assert descs, f"nothing to check in {folder}"
    failures = 0
    for desc_path in descs:
        desc = json.loads(desc_path.read_text())
        path = folder / desc["file"]
        try:
            obj = torch.load(path, weights_only=True)
            with open(path, "rb") as f:
                is_zip = f.read(2) == b"PK"
            assert is_zip == (desc["format"] == "zip"), f"format: zip={is_zip}"
            for level in desc["nesting"]:
                assert isinstance(obj, dict) and list(obj) == [level], list(obj)
                obj = obj[level]
            assert isinstance(obj, dict), type(obj)
            want = desc["tensors"]  # [[key, {"shape", "values"}], ...] in file order
            assert list(obj) == [desc["prefix"] + k for k, _ in want], list(obj)
            dtype = DTYPES[desc["dtype"]]
            for key, t in want:
                got = obj[desc["prefix"] + key]
                assert got.dtype == dtype, f"{key}: {got.dtype}"
                assert list(got.shape) == t["shape"], f"{key}: {list(got.shape)}"
                ref = torch.tensor(t["values"], dtype=torch.float32).reshape(t["shape"])
                assert torch.equal(got, ref.to(dtype)), f"{key}: values differ"
            print(f"ok    {path.name}")
        except Exception as e:  # noqa: BLE001 - report every file
            failures += 1
            print(f"FAIL  {path.name}: {e!r}")
    print(f"{len(descs) - failures}/{len(descs)} files load in torch {torch.__version__}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    torch.manual_seed(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
    elif len(sys.argv) == 1:
        write()
    else:
        sys.exit(__doc__)
