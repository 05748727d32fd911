"""Formula weights, the Python twin of crates/neural-annotators/src/formula.rs (see its header).

Every tensor of an annotator network gets values that are a pure function of (key, index), so
the reference (controlnet_aux) and our networks run on identical weights without any weight file
being committed. `python formula.py --check` prints the pinned values the Rust unit test holds.
"""
import sys

import numpy as np

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def fnv1a64(s: str) -> int:
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _splitmix64(z):
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def values(key: str, shape) -> np.ndarray:
    """float32 array of `shape` for tensor `key`."""
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape)) if shape else 1
    h = np.uint64(fnv1a64(key))
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = _splitmix64(h + i * np.uint64(0x9E3779B97F4A7C15))
    u = (x >> np.uint64(40)).astype(np.float64) * 2.0**-23 - 1.0
    rank1 = len(shape) <= 1
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if key.endswith("running_var"):
        off, scale = 1.0, 0.25
    elif key.endswith("running_mean"):
        off, scale = 0.0, 0.1
    elif rank1 and key.endswith("weight"):
        off, scale = 1.0, 0.1
    elif rank1:
        off, scale = 0.0, 0.1
    else:
        off, scale = 0.0, float(np.sqrt(6.0 / max(fan_in, 1)))
    v = (off + scale * u).astype(np.float16).astype(np.float32)
    return v.reshape(shape)


def fill(module):
    """Overwrites every parameter and float buffer of a torch module with formula values (keys as
    in its state_dict). Integer buffers (num_batches_tracked) are left alone."""
    import torch

    sd = module.state_dict()
    new = {}
    for k, t in sd.items():
        if t.is_floating_point():
            new[k] = torch.from_numpy(values(k, t.shape)).to(t.dtype)
        else:
            new[k] = t
    module.load_state_dict(new)
    return module


if __name__ == "__main__" and "--check" in sys.argv:
    vals = np.concatenate([
        values("block1.convs.0.weight", (2, 3, 1, 1)).ravel(),
        values("block1.convs.0.bias", (2,)),
        values("bn.weight", (2,)),
        values("bn.running_var", (2,)),
    ])
    print(",".join(f"{v:.8f}" for v in vals))
    big = values("model.model.1.model.3.model.3.model.3.model.1.weight", (512, 512, 4, 4))
    print(int(big.astype(np.float16).view(np.uint16).astype(np.uint64).sum()))
