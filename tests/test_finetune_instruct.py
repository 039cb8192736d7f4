"""Instruction tuning in the fine-tuning command: the loss of packed rows and of accumulated
micro-batches against references written here, the command's new flags end to end, and bad
input that must stop it before training (naming the file, the line and the field).

The references: the plain model (`rslora_jax.lora` over `LlamaForCausalLM`, no packing, no
segment ids) run on each example alone, its cross-entropies summed over the example's counted
targets and divided by their total number.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import rslora_jax as rl
from rslora_jax import data
from rslora_jax import finetune as ft
from rslora_jax.cli.finetune import command
from rslora_jax.cli.finetune.layout import accum_sharding, train_batch
from rslora_jax.hf import load_pretrained, save_pretrained
from rslora_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_params
from tests._asserts import assert_close

# optax's Adam is not strict-dtype-promotion clean (its bias correction mixes int and float).
pytestmark = pytest.mark.loose_dtypes

SEQ = 16


# ------------------------------------------------------------------------------------------
# The loss of a step: packing and accumulation against a reference


@pytest.fixture(scope="module")
def tiny():
    """A tiny model with non-zero adapters, its compiled program, and some examples."""
    cfg = LlamaConfig.tiny()
    base = init_params(cfg, jax.random.key(0))
    lora_config = rl.LoraConfig(rank=4, alpha=8.0, kernel_axes={"model/layers/.*": "lio"})
    adapters = rl.init_adapters(base, lora_config, jax.random.key(1))
    adapters = jax.tree.map(  # B is zero at init: make the adapters matter
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters
    )
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    optim = ft.OptimSettings(1e-3, "constant", 0, 0, 0.0, 1.0)
    prog = ft.program(cfg, lora_config, optim, mesh, "factored")
    rng = np.random.default_rng(0)
    examples = []
    for i, n in enumerate([4, 9, 4, 9, 12, 5, 12, 20]):  # the last one is cut to SEQ + 1
        ids = rng.integers(1, cfg.vocab_size, n)
        weights = (rng.random(n) < 0.6).astype(np.uint8)
        weights[-1] = 1
        examples.append(data.Example(ids.astype(np.int32), weights, f"ex{i}"))
    tiny = SimpleNamespace(
        cfg=cfg, base=base, config=lora_config, adapters=adapters, prog=prog, examples=examples
    )
    tiny.per_example = _reference(tiny)
    return tiny


def _reference(tiny) -> list[tuple[float, float]]:
    """Per example, run alone by the plain model: (summed cross-entropy of the counted
    targets, their number)."""
    apply = jax.jit(rl.lora(LlamaForCausalLM(tiny.cfg).apply, tiny.config, mode="factored"))
    params = rl.combine(tiny.adapters, tiny.base)
    out = []
    for ex in tiny.examples:
        ids, w = ex.ids[: SEQ + 1], ex.weights[: SEQ + 1]
        logits = apply({"params": params}, jnp.asarray(ids[None, :-1]))
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits[0].astype(jnp.float32), jnp.asarray(ids[1:])
        )
        out.append((float(jnp.sum(ce * w[1:])), float(w[1:].sum())))
    return out


def _weighted(per_example) -> tuple[float, float]:
    return sum(s for s, _ in per_example), sum(c for _, c in per_example)


def test_packed_rows_compute_what_the_examples_compute_alone(tiny):
    packed, stats = data.pack_examples(tiny.examples, SEQ)
    single, _ = data.pack_examples(tiny.examples, SEQ, pack=False)
    assert len(packed) < len(single) == len(tiny.examples)  # several examples share rows
    assert stats.truncated == 1
    ref_sum, ref_count = _weighted(tiny.per_example)
    for rows in (packed, single):
        s, c = tiny.prog.eval_sums(tiny.adapters, tiny.base, jnp.asarray(rows))
        assert float(c) == ref_count
        assert_close(float(s), ref_sum, rel=2e-5, what="summed loss")
    # The training loss and gradient: packed rows against one example per row.
    loss_p, grads_p = tiny.prog.loss_and_grads(
        tiny.adapters, tiny.base, jnp.asarray(packed[None]), jax.random.key(0)
    )
    loss_s, grads_s = tiny.prog.loss_and_grads(
        tiny.adapters, tiny.base, jnp.asarray(single[None]), jax.random.key(0)
    )
    assert_close(float(loss_p), ref_sum / ref_count, rel=2e-5, what="packed loss")
    assert_close(float(loss_s), ref_sum / ref_count, rel=2e-5, what="one-per-row loss")
    assert_close(grads_p, grads_s, rel=1e-4, what="gradient")


def test_grad_accumulation_is_one_step_on_the_whole_batch(tiny):
    rows, _ = data.pack_examples(tiny.examples, SEQ, pack=False)  # 8 rows, unequal counts
    ref_sum, ref_count = _weighted(tiny.per_example)
    sharding = accum_sharding(Mesh(np.array(jax.devices()[:1]), ("data",)))
    results = {}
    for accum in (1, 2, 4):
        batch = train_batch(rows, sharding, accum, len(rows) // accum)
        results[accum] = tiny.prog.loss_and_grads(
            tiny.adapters, tiny.base, batch, jax.random.key(0)
        )
        assert_close(float(results[accum][0]), ref_sum / ref_count, rel=2e-5, what="loss")
    for accum in (2, 4):
        assert_close(results[accum][1], results[1][1], rel=1e-4, what=f"gradient, accum {accum}")
    # Not a mean of per-row means: that differs here by many times the tolerance.
    mean_of_means = np.mean([s / c for s, c in tiny.per_example])
    assert abs(mean_of_means - ref_sum / ref_count) > 1e-3


# ------------------------------------------------------------------------------------------
# The command end to end


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Llama with the built-in tokenizer, as a Hugging Face directory."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig.tiny(vocab_size=2048, max_position_embeddings=64)
    save_pretrained(directory, init_params(config, jax.random.key(0)), config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.BUILTIN_TOKENIZER_DIR / name, directory / name)
    return directory


def _args(model, out, *extra, steps=4):
    return [
        "--model", str(model),
        "--steps", str(steps),
        "--batch-size", "4",
        "--seq-len", "48",
        "--rank", "4",
        "--lr", "1e-2",
        "--schedule", "constant",
        "--warmup-steps", "0",
        "--eval-every", "0",
        "--eval-rows", "8",
        "--save-every", "0",
        "--no-progress",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def _chat_file(path: Path, n: int = 24) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_builtin_instruct_run_lowers_the_held_out_answer_loss(tmp_path, capsys):
    """The README's main job, smaller: the built-in base on the built-in instruction set."""
    out = tmp_path / "instruct"
    argv = [
        "--steps", "30", "--batch-size", "8", "--seq-len", "128", "--lr", "2e-3",
        "--eval-every", "0", "--eval-rows", "24", "--save-every", "0", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    assert ft.main(argv) == 0
    printed = capsys.readouterr().out
    assert "builtin:instruct" in printed and "loss on: answers only" in printed
    assert "chat template: built-in default" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["answers_only"] and set(m["data"]["formats"]) == {"chat"}
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.3, m["eval_losses"]
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_methods_layers_accumulation_and_config_file(model, tmp_path, capsys):
    chat = _chat_file(tmp_path / "chat.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: [{chat}]\nmethod: rasa\nrasa-k: 1\nrasa_init: rslora\nlayers: '1'\n"
        "grad-accum: 2\nbatch-size: 99\nlora-plus-ratio: 4\nreport-to: none\n",
        encoding="utf-8",
    )
    out = tmp_path / "rasa"
    # --batch-size on the command line overrides the file's.
    argv = [*_args(model, out, "--batch-size", "2"), "--config", str(config)]
    assert ft.main(argv) == 0
    printed = capsys.readouterr().out
    assert "RaSA (k 1, rslora diagonal)" in printed and "trained: layers 1 of 2" in printed
    assert "2 rows x 2 micro-batch(es)" in printed
    assert "no peft/: rasa has no PEFT format" in printed
    assert not (out / "peft").exists() and (out / "merged" / "model.safetensors").is_file()
    saved = json.loads((out / "run.json").read_text())["args"]
    assert (saved["method"], saved["batch_size"], saved["grad_accum"]) == ("rasa", 2, 2)
    assert saved["layers"] == "1" and saved["data"] == [str(chat)]
    # Layer 0 kept its initial (zero) adapter: private factors and diagonal, as RaSA starts it
    # for unselected layers; layer 1 trained.
    _, base = load_pretrained(model)
    restored, lora_config = rl.load_adapters(out / "adapters", base)
    assert lora_config.method.name == "rasa"
    holder = restored["model"]["layers"]["self_attn"]["q_proj"]
    assert not np.asarray(holder["lora_d"][0]).any() and not np.asarray(holder["lora_b"][0]).any()
    assert np.asarray(holder["lora_b"][1]).any()
    # --resume reads the resolved configuration back (run.json), not the file.
    assert ft.main(["--resume", "--out", str(out), "--steps", "6", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["method"], m["grad_accum"], m["resumed_from_step"]) == ("rasa", 2, 4)
    assert len(m["train_losses"]) == 6


def test_pissa_dora_patterns_and_regex_targets(model, tmp_path, capsys):
    chat = _chat_file(tmp_path / "chat.jsonl")
    out = tmp_path / "dora"
    extra = [
        "--data", str(chat), "--method", "dora", "--init", "pissa",
        "--targets", ".*self_attn/(q|v)_proj", "--rank-pattern", "v_proj=2",
        "--alpha-pattern", "q_proj=4", "--no-packing", "--train-on-prompt",
    ]  # fmt: skip
    assert ft.main(_args(model, out, *extra)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["lora"]["init"]["name"] == "pissa"
    adapter_config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] and adapter_config["init_lora_weights"] == "pissa"
    assert "q_proj" in str(adapter_config["target_modules"])
    assert "k_proj" not in str(adapter_config["target_modules"])
    _, base = load_pretrained(model)
    restored, _ = rl.load_adapters(out / "adapters", base)
    layers = restored["model"]["layers"]["self_attn"]
    assert layers["v_proj"]["lora_a"].shape[-1] == 2 and layers["q_proj"]["lora_a"].shape[-1] == 4
    assert "k_proj" not in layers or "lora_a" not in layers["k_proj"]
    assert not m["data"]["answers_only"] and not m["data"]["packed"]


# ------------------------------------------------------------------------------------------
# Bad input fails before training, naming file, line and field


def _must_not_train(plan):
    raise AssertionError("training started despite bad input")


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    def rows(name, *lines):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
        return str(path)

    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    template = tmp_path / "bad.jinja"
    template.write_text("{{ raise_exception('this template refuses') }}", encoding="utf-8")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("rank: 4\nranks: 8\n", encoding="utf-8")
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('rank = 4\nmethod = "lorax"\n', encoding="utf-8")
    yaml_init = tmp_path / "init.yaml"
    yaml_init.write_text("\ninit: svd\n", encoding="utf-8")
    role = {"messages": [{"role": "robot", "content": "q"}]}
    empty_turn = {"messages": [{"role": "user", "content": ""}, good["messages"][1]]}
    no_answer = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    return {
        "unknown role": (
            ["--data", rows("r.jsonl", good, role)],
            "r.jsonl:2: messages[0].role: unknown role 'robot'",
        ),
        "turn without content": (
            ["--data", rows("c.jsonl", empty_turn)],
            "c.jsonl:1: messages[0].content: the user turn has no content",
        ),
        "no assistant turn": (
            ["--data", rows("n.jsonl", good, good, no_answer)],
            "n.jsonl:3: field 'messages' has no assistant turn",
        ),
        "empty completion": (
            [
                "--data",
                rows(
                    "e.jsonl", {"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}
                ),
            ],
            "e.jsonl:2: field 'completion' is empty after tokenization",
        ),
        "template fails": (
            ["--data", rows("t.jsonl", good, good), "--chat-template", str(template)],
            "t.jsonl:1: the chat template fails to render: this template refuses",
        ),
        "grad-accum 0": (["--grad-accum", "0"], "argument --grad-accum: expected a positive"),
        "yaml key not a flag": (
            ["--config", str(yaml_file)],
            "run.yaml:2: 'ranks' is not a flag of rslora-finetune (did you mean 'rank'?)",
        ),
        "unknown method": (["--method", "lorax"], "argument --method: invalid choice: 'lorax'"),
        "unknown method in toml": (
            ["--config", str(toml_file)],
            "run.toml:2: method: argument --method: invalid choice: 'lorax'",
        ),
        "unknown init": (["--init", "svd"], "argument --init: 'svd': unknown initialiser"),
        "unknown init in yaml": (["--config", str(yaml_init)], "init.yaml:2: init: argument"),
        "layers out of range": (["--layers", "0-5"], "--layers '0-5': the model has 2 layers"),
        "rank pattern matches nothing": (
            ["--rank-pattern", "o_projj=2"],
            "--rank-pattern: 'o_projj' matches no adapted layer",
        ),
        "rasa-k without rasa": (["--rasa-k", "2"], "--rasa-k 2 needs --method rasa"),
        "tracker": (["--report-to", "tensorboard,mlflow"], "unknown tracker 'mlflow'"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown role",
        "turn without content",
        "no assistant turn",
        "empty completion",
        "template fails",
        "grad-accum 0",
        "yaml key not a flag",
        "unknown method",
        "unknown method in toml",
        "unknown init",
        "unknown init in yaml",
        "layers out of range",
        "rank pattern matches nothing",
        "rasa-k without rasa",
        "tracker",
    ],
)
def test_bad_input_fails_before_training(model, tmp_path, capsys, monkeypatch, case):
    extra, message = _bad_cases(tmp_path)[case]
    monkeypatch.setattr(command, "train", _must_not_train)
    out = tmp_path / "out"
    chat = _chat_file(tmp_path / "chat.jsonl")
    assert ft.main(_args(model, out, "--data", str(chat), *extra)) == ft.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("rslora-finetune: error: ") and message in err, err
    assert not out.exists()
