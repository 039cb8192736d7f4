"""LoraConfig: the scale as the papers write it, PEFT pattern semantics, and every bad input."""

from __future__ import annotations

import math

import jax.numpy as jnp
import pytest

from rslora_jax import LoraConfig


@pytest.mark.parametrize("r", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("alpha", [1.0, 8.0, 32.0])
def test_scale_is_alpha_over_sqrt_r_or_alpha_over_r(r, alpha):
    assert LoraConfig(rank=r, alpha=alpha).scale_for("x") == pytest.approx(alpha / math.sqrt(r))
    assert LoraConfig(rank=r, alpha=alpha, scaling="lora").scale_for("x") == pytest.approx(
        alpha / r
    )
    # rsLoRA equals LoRA with alpha' = alpha * sqrt(r) (methods reference).
    assert LoraConfig(rank=r, alpha=alpha).scale_for("x") == pytest.approx(
        LoraConfig(rank=r, alpha=alpha * math.sqrt(r), scaling="lora").scale_for("x")
    )


def test_rank_and_alpha_patterns_follow_peft_suffix_rule():
    cfg = LoraConfig(
        rank=8,
        alpha=16.0,
        rank_pattern={"layers/0/self_attn/q_proj": 4, "v_proj": 32},
        alpha_pattern={"o_proj": 2.0},
    )
    assert cfg.rank_for("model/layers/0/self_attn/q_proj") == 4
    assert cfg.rank_for("model/layers/10/self_attn/q_proj") == 8  # '0' must not match '10'
    assert cfg.rank_for("model/layers/3/self_attn/v_proj") == 32
    assert cfg.rank_for("model/layers/3/self_attn/xv_proj") == 8  # suffix at a '/' boundary only
    assert cfg.scale_for("model/layers/3/self_attn/v_proj") == pytest.approx(16.0 / math.sqrt(32))
    assert cfg.scale_for("model/layers/3/self_attn/o_proj") == pytest.approx(2.0 / math.sqrt(8))
    lora = LoraConfig(rank=8, alpha=16.0, scaling="lora", rank_pattern={"v_proj": 32})
    assert lora.scale_for("a/v_proj") == pytest.approx(16.0 / 32)
    first = LoraConfig(rank_pattern={"proj": 2, "q_proj": 4})  # first matching key wins (PEFT)
    assert first.rank_for("a/q_proj") == 4 and first.rank_for("a/proj") == 2


def test_targets_forms():
    k = jnp.zeros((4, 4))
    assert LoraConfig(targets=["q_proj"]).is_target("m/l/0/q_proj", k)
    assert not LoraConfig(targets=["q_proj"]).is_target("m/l/0/xq_proj", k)
    assert LoraConfig(targets=["attn/q_proj"]).is_target("m/attn/q_proj", k)
    assert LoraConfig(targets=r".*/(q|v)_proj").is_target("m/l/0/v_proj", k)
    assert not LoraConfig(targets=r"(q|v)_proj").is_target("m/l/0/v_proj", k)  # fullmatch
    assert LoraConfig(targets=lambda p, w: w.shape[0] == 4).is_target("any", k)
    assert LoraConfig().is_target("m/mlp/up", k)
    assert not LoraConfig().is_target("lm_head", k)  # all-linear skips the output layer
    assert not LoraConfig(exclude=["up"]).is_target("m/mlp/up", k)


def test_config_is_hashable_and_round_trips_through_dict():
    cfg = LoraConfig(
        rank=4, alpha=2.0, targets=["q"], rank_pattern={"q": 2}, kernel_axes={"x": "lio"}
    )
    hash(cfg)
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["dtype"] == "float32"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"LoraConfig.rank must be a positive int, got 0"),
        ({"rank": 2.5}, r"LoraConfig.rank must be a positive int, got 2.5"),
        ({"rank": True}, r"LoraConfig.rank must be a positive int, got True"),
        ({"alpha": -1.0}, r"LoraConfig.alpha must be a positive finite number, got -1.0"),
        ({"alpha": float("nan")}, r"LoraConfig.alpha must be a positive finite number, got nan"),
        ({"alpha": "8"}, r"LoraConfig.alpha must be a positive number, got '8'"),
        (
            {"scaling": "sqrt"},
            r"LoraConfig.scaling must be one of \('rslora', 'lora'\), got 'sqrt'",
        ),
        ({"init": "normal"}, r"LoraConfig.init must be one of .*, got 'normal'"),
        ({"targets": "("}, r"LoraConfig.targets: invalid regex '\('"),
        ({"targets": []}, r"LoraConfig.targets must be .* got \[\]"),
        ({"targets": 3}, r"LoraConfig.targets must be .* got 3"),
        ({"exclude": "all-linear"}, r"LoraConfig.exclude cannot be 'all-linear'"),
        (
            {"rank_pattern": {"q": 0}},
            r"LoraConfig.rank_pattern\['q'\] must be a positive int, got 0",
        ),
        ({"rank_pattern": ["q"]}, r"LoraConfig.rank_pattern must be a mapping"),
        ({"rank_pattern": {"[": 2}}, r"LoraConfig.rank_pattern: invalid regex '\['"),
        ({"alpha_pattern": {"q": 0}}, r"LoraConfig.alpha_pattern\['q'\] must be a positive finite"),
        ({"dropout": 1.0}, r"LoraConfig.dropout must be a float in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"LoraConfig.dropout must be a float in \[0, 1\), got -0.1"),
        ({"dtype": jnp.int32}, r"LoraConfig.dtype must be a float dtype"),
        ({"dtype": "nope"}, r"LoraConfig.dtype must be a float dtype, got 'nope'"),
        ({"fan_in_fan_out": 3}, r"LoraConfig.fan_in_fan_out must be a bool or a path regex, got 3"),
        ({"kernel_axes": "lix"}, r"LoraConfig.kernel_axes: expected a string .* got 'lix'"),
        ({"kernel_axes": {"q": "ll"}}, r"LoraConfig.kernel_axes\['q'\]: 'll' needs at least one"),
    ],
)
def test_invalid_fields_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown fields \['use_dora_x'\]"):
        LoraConfig.from_dict({"rank": 2, "use_dora_x": True})
