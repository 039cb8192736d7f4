"""examples/rank_sweep.py at its CI size (--small) on the shipped base model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

# optax's Adam is not strict-dtype-promotion clean (its bias correction mixes int and float).
pytestmark = pytest.mark.loose_dtypes

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "rank_sweep.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("rank_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_sweep_writes_figures_and_table(tmp_path, capsys):
    sweep = _load_script()
    # Two methods keep CI short (one compilation per run); RaSA is checked below without
    # training.
    results = sweep.main(["--small", "--methods", "lora,rslora", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "grad_norms.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"config", "runs", "slopes", "final_losses", "wall_seconds"}
    methods = saved["config"]["methods"]
    assert methods == ["lora", "rslora"]
    assert saved["config"]["ranks"] == [4, 16] and saved["config"]["steps"] == 6
    assert {(r["method"], r["rank"]) for r in saved["runs"]} == {
        (m, r) for m in methods for r in (4, 16)
    }
    for run in saved["runs"]:
        assert len(run["train_losses"]) == 6 and len(run["grad_norms_b"]) == 6
        assert np.isfinite(run["final_loss"]) and run["grad_norm_b_init"] > 0
        assert run["train_losses"][0] == run["first_loss"]
    # Same base, batch and init seed: at step 0 (B = 0) every run sees the base model's loss.
    first_losses = [r["first_loss"] for r in saved["runs"]]
    assert np.ptp(first_losses) <= 1e-6 * max(first_losses)  # (rounding them can split a tie)
    assert set(saved["slopes"]) == set(methods)
    assert set(saved["final_losses"]) == {f"{m}/r{r}" for m in methods for r in (4, 16)}

    # Independent check of the gradient-norm scaling at init: grad B = gamma * (x A)^T g, and
    # rsLoRA's gamma at r=16 is 4x LoRA's, so the ratio of norms between the methods at one
    # rank is gamma_rs / gamma_lora = sqrt(r) (the same A, batch and base).
    norms = {(r["method"], r["rank"]): r["grad_norm_b_init"] for r in saved["runs"]}
    for rank in (4, 16):
        ratio = norms[("rslora", rank)] / norms[("lora", rank)]
        np.testing.assert_allclose(ratio, np.sqrt(rank), rtol=1e-4)
    np.testing.assert_allclose(saved["slopes"]["rslora"] - saved["slopes"]["lora"], 0.5, atol=1e-4)
    assert "gradient-norm slope" in printed and "wall time" in printed


def test_method_registry_builds_adapters_for_every_method():
    import jax

    from rslora_jax import init_adapters
    from rslora_jax.hf import load_config
    from rslora_jax.models import LlamaConfig, init_params

    sweep = _load_script()
    assert {"lora", "rslora"} <= set(sweep.METHODS)
    assert ("rasa" in sweep.METHODS) == sweep.HAS_RASA
    config = LlamaConfig.from_hf(load_config(sweep.DEFAULT_MODEL))
    abstract = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    for name, make in sweep.METHODS.items():
        for rank in (4, 256):  # 256: the largest rank the shipped base allows
            lora_config = make(rank, 16.0)
            adapters = jax.eval_shape(
                lambda k, c=lora_config: init_adapters(abstract, c, k), jax.random.key(0)
            )
            q = adapters["model"]["layers"]["self_attn"]["q_proj"]
            assert q["lora_a"].shape[:2] == (4, 256), name  # (layers, d_in, ...)
    lora, rslora = sweep.METHODS["lora"](16, 16.0), sweep.METHODS["rslora"](16, 16.0)
    path = "model/layers/mlp/down_proj"
    assert lora.scale_for(path) == 1.0 and rslora.scale_for(path) == 4.0
