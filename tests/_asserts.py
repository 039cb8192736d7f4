"""Floating-point comparisons relative to a tensor's scale, for arrays and whole pytrees.

Two code paths that agree mathematically (factored vs fused vs merged, JAX vs PyTorch, one device
vs eight) differ by rounding, and XLA sums in a different order on another CPU. An entry near zero
can then differ by far more than ``rtol`` times itself, so elementwise ``rtol``/``atol`` checks
pass on one machine and fail on the next. `assert_close` bounds the error of each tensor by its
own scale instead::

    ||actual - expected|| <= rel * ||expected||      (norm="fro": Frobenius, the default)
    max |actual - expected| <= rel * max |expected|   (norm="max")

computed in float64. Pick ``rel`` from the dtype and the math: about 1e-5 for float32 paths that
differ only in summation order, a few 1e-5 to 1e-4 where one path rounds an intermediate (a
merged kernel, a long chain of layers), 1e-2 and up for bfloat16. Results that are equal by
construction (a bit-identical resume, B = 0 leaving an output unchanged) stay exact:
``np.testing.assert_array_equal``.

Set ``RSLORA_TEST_CLOSE_LOG=<file>`` to append every comparison's relative error and tolerance to
<file> (one tab-separated line each): on a new machine it shows how much headroom each has.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

_ARRAY_TYPES = (np.ndarray, np.generic, jax.Array, float, int, complex)


def _as_f64(x: Any) -> np.ndarray:
    return np.asarray(np.asarray(x), np.float64)


def rel_error(actual: Any, expected: Any, norm: str = "fro") -> float:
    """||actual - expected|| / ||expected|| of two arrays of one shape (float64; 0/0 is 0).

    Args:
      actual: the array under test.
      expected: the reference array.
      norm: "fro" (Frobenius norm of the flattened arrays) or "max" (largest absolute entry).

    Returns:
      The relative error; ``inf`` where ``expected`` is zero and ``actual`` is not, ``nan`` where
      either holds a NaN.
    """
    a, b = _as_f64(actual), _as_f64(expected)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: actual {a.shape}, expected {b.shape}")
    if norm == "fro":
        num, den = np.linalg.norm((a - b).ravel()), np.linalg.norm(b.ravel())
    elif norm == "max":
        num, den = np.abs(a - b).max(initial=0.0), np.abs(b).max(initial=0.0)
    else:
        raise ValueError(f"norm must be 'fro' or 'max', got {norm!r}")
    if np.isnan(num) or np.isnan(den):
        return float("nan")
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)


def _describe(path: str, a: np.ndarray, b: np.ndarray, err: float, rel: float, norm: str) -> str:
    diff = np.abs(a - b)
    if not diff.size:
        worst = "empty"
    else:
        nan = np.isnan(diff)
        flat = int(np.argmax(nan)) if nan.any() else int(np.argmax(diff))
        idx = np.unravel_index(flat, a.shape)
        where = tuple(int(i) for i in idx)
        worst = f"worst entry {where}: {a[idx]:.8g} vs {b[idx]:.8g}"
    return (
        f"  {path or '<array>'} {a.shape}: relative error ({norm}) {err:.3g} > rel {rel:g}; "
        f"max |expected| {np.abs(b).max(initial=0.0):.3g}; {worst}"
    )


def _log(what: str, path: str, err: float, rel: float, norm: str) -> None:
    log = os.environ.get("RSLORA_TEST_CLOSE_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        with open(log, "a") as f:
            f.write(f"{test}\t{what}\t{path}\t{err:.3g}\t{rel:g}\t{norm}\n")


def assert_close(
    actual: Any,
    expected: Any,
    rel: float,
    *,
    what: str = "",
    norm: str = "fro",
    whole: bool = False,
) -> None:
    """Asserts that `actual` equals `expected` up to `rel` relative to each tensor's own scale.

    Arrays (numpy, JAX, Python numbers) compare as one tensor; anything else as a pytree whose
    structure must equal `expected`'s exactly, leaf by leaf (each leaf relative to its own
    norm). Shapes must match; dtypes may differ (references are often float64). Integer and
    boolean leaves must be equal. A zero reference needs an exactly zero result.

    Args:
      actual: the result under test: an array or a pytree of arrays.
      expected: the reference, same structure and shapes.
      rel: the relative tolerance.
      what: a label for the failure message (the test's case, mode, ...).
      norm: "fro" (Frobenius) or "max" (largest absolute entry); see the module docstring.
      whole: one relative error over all float leaves together instead of one per leaf: for
        parameters after Adam steps, where a near-zero gradient's rounding can become a whole
        lr-sized step in one entry, so the tolerance is of the order of lr relative to the
        norm of all the parameters (never compare those entry by entry).

    Raises:
      AssertionError: naming every leaf that fails with its relative error, the reference's
        scale and the worst entry.

    Example:
      >>> assert_close(np.array([1.0, 1e-9]), np.array([1.0, 0.0]), rel=1e-6)
    """
    label = f"{what}: " if what else ""
    if isinstance(expected, _ARRAY_TYPES) or isinstance(actual, _ARRAY_TYPES):
        pairs = [("", actual, expected)]
    else:
        got, got_def = jax.tree_util.tree_flatten_with_path(actual)
        want, want_def = jax.tree_util.tree_flatten(expected)
        if got_def != want_def:
            raise AssertionError(
                f"{label}tree structures differ:\n  actual   {got_def}\n  expected {want_def}"
            )
        pairs = [(jax.tree_util.keystr(p), x, y) for (p, x), y in zip(got, want)]
    failures, floats = [], []
    for path, x, y in pairs:
        a, b = np.asarray(x), np.asarray(y)
        if a.shape != b.shape:
            failures.append(f"  {path or '<array>'}: shapes differ, {a.shape} vs {b.shape}")
            continue
        if not (np.issubdtype(b.dtype, np.inexact) or np.issubdtype(a.dtype, np.inexact)):
            if not np.array_equal(a, b):
                failures.append(f"  {path or '<array>'}: non-float leaves differ: {a} vs {b}")
            continue
        floats.append((path, _as_f64(a), _as_f64(b)))
    if whole and floats:
        err = rel_error(*(np.concatenate([v[i].ravel() for v in floats]) for i in (1, 2)), norm)
        _log(what, "<all leaves>", err, rel, norm)
        if not err <= rel:
            # The leaf that contributes most to the error, and its worst entry.
            path, a, b = max(
                floats, key=lambda v: np.nan_to_num(np.linalg.norm(v[1] - v[2]), nan=np.inf)
            )
            failures.append(
                f"  all leaves together: relative error ({norm}) {err:.3g} > rel {rel:g}"
            )
            failures.append(_describe(path, a, b, rel_error(a, b, norm), rel, norm))
        floats = []
    for path, a, b in floats:
        err = rel_error(a, b, norm)
        _log(what, path, err, rel, norm)
        if not err <= rel:  # also catches nan
            failures.append(_describe(path, a, b, err, rel, norm))
    if failures:
        raise AssertionError(f"{label}not close:\n" + "\n".join(failures))
