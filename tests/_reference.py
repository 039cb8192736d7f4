"""Independent reference formulas (numpy, float64) for the tests."""

from __future__ import annotations

import math
import string

import numpy as np


def gamma(alpha: float, r: int, scaling: str) -> float:
    """The paper's scaling factor, written out."""
    return alpha / math.sqrt(r) if scaling == "rslora" else alpha / r


def delta_kernel(a, b, scale: float, roles: str, kernel_shape) -> np.ndarray:
    """scale * A @ B laid out like the kernel, via an explicit einsum over named axes."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    letters = iter(string.ascii_lowercase)
    names = [next(letters) for _ in roles]
    rank = "z"
    l_n = [n for n, r in zip(names, roles) if r == "l"]
    i_n = [n for n, r in zip(names, roles) if r == "i"]
    o_n = [n for n, r in zip(names, roles) if r == "o"]
    size = dict(zip(names, kernel_shape))
    a_full = a.reshape(*[size[n] for n in l_n], *[size[n] for n in i_n], a.shape[-1])
    b_full = b.reshape(*[size[n] for n in l_n], b.shape[-2], *[size[n] for n in o_n])
    eq = f"{''.join(l_n + i_n)}{rank},{''.join(l_n)}{rank}{''.join(o_n)}->{''.join(names)}"
    return scale * np.einsum(eq, a_full, b_full)


def merge_reference(params, scale_for, roles_for):
    """Plain tree with kernel' = kernel + scale * A @ B (float64 math, cast to kernel dtype)."""

    def walk(tree, prefix):
        if not isinstance(tree, dict):
            return tree
        if "kernel" in tree and "lora_a" in tree:
            path = "/".join(prefix)
            k = np.asarray(tree["kernel"], np.float64)
            d = delta_kernel(
                tree["lora_a"], tree["lora_b"], scale_for(path), roles_for(path), k.shape
            )
            out = {key: v for key, v in tree.items() if not key.startswith("lora_")}
            out["kernel"] = (k + d).astype(np.asarray(tree["kernel"]).dtype)
            return out
        return {key: walk(v, (*prefix, str(key))) for key, v in tree.items()}

    return walk(params, ())


def randomize_b(params, key_seed: int = 0, std: float = 0.5):
    """Gives every lora_b random values (init leaves them zero, which hides layout bugs)."""
    rng = np.random.default_rng(key_seed)

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for k, v in tree.items():
            if k == "lora_b":
                out[k] = (rng.standard_normal(v.shape) * std).astype(np.asarray(v).dtype)
            else:
                out[k] = walk(v)
        return out

    return walk(params)
