"""PEFT's adapter_config.json rules, as PEFT applies them (reimplemented, no peft import).

- which modules a config selects (``target_modules``, ``exclude_modules``,
  ``layers_to_transform``; ``"all-linear"`` as the model family expands it),
- per-module values from ``rank_pattern`` / ``alpha_pattern`` (the first key matching a
  '.'-bounded suffix of the module name) and the inverse: patterns that reproduce given values,
- the options import_peft refuses (anything that changes what the adapter computes and that we
  do not implement).

Method-specific fields (``use_dora``, ``init_lora_weights``) are checked in
:mod:`rslora_jax.hf.peft`'s "adapter methods" section.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rslora_jax.core.config import LoraConfig
from rslora_jax.models.families import LinearModule

# adapter_config.json fields that change what the adapter computes and that we do not
# implement: importing refuses any value other than the neutral one.
NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "bias": ("none",),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "megatron_config": (None,),
}


# Every field of PEFT's LoraConfig (and PeftConfig) as of PEFT 0.21; a field outside this set is
# a typo (e.g. "lora_alhpa", which PEFT would reject or ignore) or from a newer PEFT: a warning.
KNOWN_FIELDS = frozenset(
    {
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping",
        "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying", "eva_config",
        "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights",
        "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
        "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
        "megatron_config", "megatron_core", "modules_to_save", "monteclora_config", "peft_type",
        "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
        "target_modules", "target_parameters", "task_type", "trainable_token_indices",
        "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config",
    }
)  # fmt: skip


class PeftFormatWarning(UserWarning):
    """An adapter file is readable but relies on a default that may not be what was meant."""


def last(name: str, sep: str) -> str:
    """The last component of a `sep`-joined name."""
    return name.rsplit(sep, 1)[-1]


def patterns(
    values: Mapping[str, Any], default: Any, sep: str, all_names: Sequence[str]
) -> dict[str, Any]:
    """Pattern dict that gives ``values[name]`` for every name under PEFT's suffix rule.

    Names are grouped by their last component: a group whose members all have the same
    non-default value gets one key (the component, e.g. ``v_proj``); otherwise each member that
    differs from `default` gets a key matching exactly its full name. `all_names` are all names
    the patterns may be applied to (only the adapted ones here).
    """
    groups: dict[str, list[str]] = {}
    for name in all_names:
        groups.setdefault(last(name, sep), []).append(name)
    out: dict[str, Any] = {}
    for component in sorted(groups):
        members = groups[component]
        vals = {values[n] for n in members}
        if len(vals) == 1:
            (val,) = vals
            if val != default:
                out[re.escape(component)] = val
            continue
        for name in members:
            if values[name] != default:
                out[re.escape(name)] = values[name]
    return out


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule (``peft.utils.other.get_pattern_key``): the first key that matches a suffix."""
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return val
    return default


def number(x: float) -> int | float:
    """An int when `x` is integral (as PEFT writes ``lora_alpha``), else a float."""
    return int(x) if float(x).is_integer() else float(x)


def target_modules(modules: Mapping[str, LinearModule], adapted: set[str]) -> list[str] | str:
    """PEFT's target_modules: last name components, or an exact regex if those over-match."""
    components = sorted({last(modules[p].names[0], ".") for p in adapted})
    selected = {p for p, m in modules.items() if last(m.names[0], ".") in components}
    if selected == adapted:
        return components
    parts = [re.escape(name) for path in sorted(adapted) for name in modules[path].names]
    return "(?:" + "|".join(parts) + ")"


def check_options(meta: Mapping[str, Any], path: Path, strict: bool) -> None:
    """Refuses options of an adapter_config.json that import_peft does not implement.

    Raises:
        ValueError: naming the file, the field and its value.
    """
    where = f"import_peft: {str(path)!r}"
    if meta.get("peft_type") != "LORA":
        raise ValueError(
            f"{where} has peft_type={meta.get('peft_type')!r}; only 'LORA' adapters are supported"
        )
    unknown = sorted(set(meta) - KNOWN_FIELDS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(KNOWN_FIELDS), n=1, cutoff=0.8)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        warnings.warn(
            f"{where} has fields that PEFT's LoraConfig does not define: {', '.join(hints)}; "
            "they are ignored (a typo, or a field of a newer PEFT)",
            PeftFormatWarning,
            stacklevel=3,
        )
    for field, neutral in NEUTRAL_OPTIONS.items():
        if field in meta and meta[field] not in neutral:
            raise ValueError(
                f"{where} sets {field}={meta[field]!r}, which rslora_jax does not implement "
                f"(supported: {neutral[0]!r})"
            )
    to_save = meta.get("modules_to_save")
    if to_save not in (None, []):
        if strict:
            raise ValueError(
                f"{where} sets modules_to_save={to_save!r}: full copies of modules are not "
                "supported (pass strict=False to ignore them, which changes the outputs)"
            )
        warnings.warn(
            f"{where}: ignoring modules_to_save={to_save!r} (strict=False)",
            PeftFormatWarning,
            stacklevel=3,
        )
    r = meta.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r={r!r} must be a positive int")
    alpha = meta.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}: lora_alpha={alpha!r} must be a positive number")
    if "use_rslora" in meta and not isinstance(meta["use_rslora"], bool):
        raise ValueError(f"{where}: use_rslora={meta['use_rslora']!r} must be true or false")
    for field in ("rank_pattern", "alpha_pattern"):
        pats = meta.get(field) or {}
        if not isinstance(pats, dict):
            raise ValueError(f"{where}: {field}={pats!r} must be a dict of regex -> value")
        for key, val in pats.items():
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"{where}: {field} key {key!r} is not a regex: {err}") from None
            kind = int if field == "rank_pattern" else (int, float)
            if isinstance(val, bool) or not isinstance(val, kind) or not val > 0:
                raise ValueError(f"{where}: {field}[{key!r}]={val!r} is not a valid value")
    if meta.get("target_modules") is None:
        raise ValueError(f"{where} has no target_modules")


def peft_selects(meta: Mapping[str, Any], name: str, all_linear: Sequence[str]) -> bool:
    """PEFT's target rule (``peft.tuners.tuners_utils.check_target_module_exists``).

    `all_linear` is what ``target_modules="all-linear"`` expands to for this model.
    """
    exclude = meta.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    target = meta.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":
        # Expanded by PEFT into the last components of every Linear but the output layer.
        target = all_linear
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    if name in target:
        return True
    found = any(name.endswith(f".{t}") for t in target)
    indexes = meta.get("layers_to_transform")
    if indexes is None or indexes == [] or not found:
        return found
    pattern = meta.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pat in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def our_patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """Patterns over our '/' paths that give ``values[path]`` (see :func:`patterns`)."""
    return patterns(values, default, "/", sorted(values))


def our_targets(adapted: set[str], meta: Mapping[str, Any], all_paths: Sequence[str]) -> Any:
    """A LoraConfig.targets that selects exactly `adapted` (PEFT's list if it does)."""
    target = meta.get("target_modules")
    if isinstance(target, list) and not meta.get("exclude_modules"):
        names = tuple(sorted(t.replace(".", "/") for t in target))
        probe = LoraConfig(targets=names)
        if {p for p in all_paths if probe.is_target(p, None)} == adapted:
            return names
    return "(?:" + "|".join(re.escape(p) for p in sorted(adapted)) + ")"
