"""Several adapters in one batch: ``lora(...)(variables, x, adapter_index=rows)`` over adapters
stacked by `rslora_jax.ops.stack.stack_adapters`.

Reference: the same model run row by row, each row alone with its own (unstacked) adapter
through the single-adapter factored forward, for every method (LoRA, DoRA, RaSA with its shared
pools) and layer layout (scanned, unscanned), in every mode that can serve it; and the per-row
dispatch against a formula written here. Adapters are random (B not zero), so a row computed
with another row's adapter cannot pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax.execution.dispatch import Contraction, per_row_outputs
from rslora_jax.models import LlamaConfig, LlamaForCausalLM, init_params
from rslora_jax.ops.stack import stack_adapters, stack_specs
from tests._asserts import assert_close

ROWS = np.array([2, 0, 1])
IDS = np.random.default_rng(0).integers(0, 64, (3, 5))


def _config(method, scan: bool) -> rl.LoraConfig:
    axes = {"kernel_axes": {"model/layers/.*": "lio"}} if scan else {}
    targets = {} if isinstance(method, rl.RaSA) else {"targets": "all-linear"}
    return rl.LoraConfig(rank=4, method=method, **targets, **axes)


def _random(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), tree
    )


CASES = {
    "lora-scanned": (rl.LoRA(), True),
    "lora-unscanned": (rl.LoRA(), False),
    "dora-scanned": (rl.DoRA(), True),
    "rasa-scanned": (rl.RaSA(k=1), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_equal_one_adapter_at_a_time(case):
    method, scan = CASES[case]
    cfg = LlamaConfig.tiny(scan_layers=scan)
    base = init_params(cfg, jax.random.key(0))
    lc = _config(method, scan)
    adapters = [_random(rl.init_adapters(base, lc, jax.random.key(i)), i) for i in range(3)]
    stacked = rl.combine(stack_adapters(adapters, lc), base)
    model = LlamaForCausalLM(cfg)
    single = jax.jit(rl.lora(model.apply, lc, mode="factored"))
    alone = [np.asarray(single({"params": rl.combine(a, base)}, IDS)) for a in adapters]
    assert np.max(np.abs(alone[0] - alone[1])) > 1e-3  # the adapters differ
    for mode in ("auto", "factored"):  # "fused" serves adapter_index as "auto" does
        apply = jax.jit(rl.lora(model.apply, lc, mode=mode))
        out = np.asarray(apply({"params": stacked}, IDS, adapter_index=jnp.asarray(ROWS)))
        for b, r in enumerate(ROWS):
            assert_close(out[b], alone[r][b], rel=1e-5, norm="max", what=f"row {b} ({mode})")


def test_per_row_dispatch_matches_formula():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((5,)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    col = jnp.asarray(rng.uniform(0.5, 1.5, (2, 5)), jnp.float32)
    rows = jnp.array([1, 0, 1])
    lin = Contraction(("bti", "io", "bto"), w, bias)
    (y,) = per_row_outputs(x, [lin], [(a, b, 0.5)], rows)
    (yc,) = per_row_outputs(x, [lin], [(a, b, 0.5)], rows, cols=[col])
    xn, wn, an, bn, cn = map(np.asarray, (x, w, a, b, col))
    for i, r in enumerate(np.asarray(rows)):
        plain = xn[i] @ wn
        delta = 0.5 * (xn[i] @ an[r]) @ bn[r]
        assert_close(np.asarray(y[i]), plain + bias + delta, rel=1e-6, norm="max")
        dora = plain + bias + (cn[r] - 1) * plain + cn[r] * delta  # PEFT's DoRA form
        assert_close(np.asarray(yc[i]), dora, rel=1e-6, norm="max")


def test_per_row_gradients_reach_each_rows_adapter():
    """Training several adapters in one batch: row b's loss moves only adapter rows[b]."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
    lin = Contraction(("bti", "io", "bto"), jnp.asarray(rng.standard_normal((4, 5)), jnp.float32))
    a = jnp.asarray(rng.standard_normal((3, 4, 2)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 2, 5)), jnp.float32)

    def loss(a, b):
        (y,) = per_row_outputs(x, [lin], [(a, b, 1.0)], jnp.array([2, 0]))
        return jnp.sum(y**2)

    ga, gb = jax.grad(loss, argnums=(0, 1))(a, b)
    assert float(jnp.abs(ga[1]).max()) == 0.0 and float(jnp.abs(gb[1]).max()) == 0.0
    assert float(jnp.abs(ga[0]).max()) > 0 and float(jnp.abs(ga[2]).max()) > 0


def test_stack_layout_and_specs():
    cfg = LlamaConfig.tiny()
    base = init_params(cfg, jax.random.key(0))
    lc = _config(rl.LoRA(), scan=True)
    one = rl.init_adapters(base, lc, jax.random.key(0))
    stacked = stack_adapters([one, one, rl.combine(one, base)], lc)  # full trees work too
    q = one["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert stacked["model"]["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (
        q.shape[0],
        3,
        *q.shape[1:],
    )
    specs = {"model": {"layers": {"self_attn": {"q_proj": {"lora_a": P(None, "fsdp")}}}}}
    sub = {"model": {"layers": {"self_attn": {"q_proj": {"lora_a": q}}}}}
    got = stack_specs(specs, sub, lc)["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert got == P(None, None, "fsdp", None)


def test_stack_and_index_errors():
    cfg = LlamaConfig.tiny()
    base = init_params(cfg, jax.random.key(0))
    lc = _config(rl.LoRA(), scan=True)
    lc8 = rl.LoraConfig(rank=8, targets="all-linear", kernel_axes={"model/layers/.*": "lio"})
    one = rl.init_adapters(base, lc, jax.random.key(0))
    with pytest.raises(ValueError, match="no adapters given"):
        stack_adapters([], lc)
    with pytest.raises(ValueError, match=r"lora_a has shapes \[\(2, 48, 4\), \(2, 48, 8\)\]"):
        stack_adapters([one, rl.init_adapters(base, lc8, jax.random.key(0))], lc)
    qv = rl.LoraConfig(rank=4, targets=["q_proj"], kernel_axes={"model/layers/.*": "lio"})
    with pytest.raises(ValueError, match="same targets"):
        stack_adapters([one, rl.init_adapters(base, qv, jax.random.key(0))], lc)
    apply = rl.lora(LlamaForCausalLM(cfg).apply, lc, mode="merged")
    with pytest.raises(ValueError, match="mode='merged' cannot serve it"):
        apply({"params": rl.combine(one, base)}, IDS, adapter_index=jnp.asarray(ROWS))
    apply = rl.lora(LlamaForCausalLM(cfg).apply, lc)
    with pytest.raises(ValueError, match="1-D integer array"):
        apply({"params": rl.combine(one, base)}, IDS, adapter_index=jnp.ones((3,)))
    with pytest.raises(ValueError, match="leading adapter axis"):  # not stacked
        apply({"params": rl.combine(one, base)}, IDS, adapter_index=jnp.asarray(ROWS))
