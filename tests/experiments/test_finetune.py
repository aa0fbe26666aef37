"""Fine-tuning from a pretrained checkpoint: `model.init_from` and `data.tokenizer=wordpiece`.

Small random Hugging Face `BertModel` / `RoFormerModel`s (the smoke preset's encoder:
width 32, 1 layer, 2 heads, FFN 64) are saved with `save_pretrained` next to a
`vocab.txt` of CLUENER's characters. The train state at step 0 must hold the
checkpoint's tensors in the encoder (compared with the PyTorch state dict through this
file's own name and layout map) and the task head's own initialisation; the
command line fine-tunes from it, resumes without reloading it, and rejects bad
checkpoints with one error line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from kexue.optim import parameter_path
from tests.conftest import CLUENER_DIR, CLUENER_MISSING, HAVE_CLUENER
from tests.experiments.test_train_cli import records, run_cli

torch = pytest.importorskip("torch", reason="the random checkpoints are made by "
                            "transformers with torch (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="the random checkpoints need "
                                   "transformers (pip install -e '.[test]')")

pytestmark = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)
CONFIG = "configs/cluener_globalpointer.py"
WIDTH, LAYERS, HEADS, MLP = 32, 1, 2, 64  # the smoke preset's encoder
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def cluener_vocab() -> list[str]:
    """Special tokens, every character of CLUENER (lower-cased) and `##` letters / digits."""
    chars: set[str] = set()
    for split in ("train", "dev"):
        with open(Path(CLUENER_DIR) / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                chars.update(json.loads(line)["text"].lower())
    chars = sorted(c for c in chars if not c.isspace())
    return SPECIALS + chars + ["##" + c for c in chars if c.isascii() and c.isalnum()]


def save_checkpoint(directory: Path, kind: str, vocab: list[str], seed: int) -> dict:
    """A random `BertModel` / `RoFormerModel` (every weight drawn) saved with its vocab;
    returns its state dict as float64 NumPy arrays."""
    config_class = {"bert": transformers.BertConfig, "roformer": transformers.RoFormerConfig}
    model_class = {"bert": transformers.BertModel, "roformer": transformers.RoFormerModel}
    config = config_class[kind](vocab_size=len(vocab), hidden_size=WIDTH,
                                num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                intermediate_size=MLP, max_position_embeddings=64,
                                type_vocab_size=2)
    model = model_class[kind](config)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:  # not RoFormer's fixed sinusoids
                noise = rng.normal(0.0, 0.1, tuple(parameter.shape))
                parameter.copy_(torch.from_numpy(
                    (noise + name.endswith("LayerNorm.weight")).astype(np.float32)))
    directory.mkdir(parents=True)
    model.save_pretrained(str(directory))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return {name: tensor.double().numpy() for name, tensor in model.state_dict().items()}


def expected_encoder(state_dict: dict, kind: str) -> dict[str, np.ndarray]:
    """kexue parameter path → value, from the PyTorch names and `nn.Linear` [out, in]."""
    d, h = WIDTH, HEADS
    expected = {
        "encoder/embed/embedding": state_dict["embeddings.word_embeddings.weight"],
        "encoder/type_embed/embedding": state_dict["embeddings.token_type_embeddings.weight"],
        "encoder/transformer/norm/scale": state_dict["embeddings.LayerNorm.weight"],
        "encoder/transformer/norm/bias": state_dict["embeddings.LayerNorm.bias"],
    }
    if kind == "bert":
        expected["encoder/position_embed/embedding"] = state_dict[
            "embeddings.position_embeddings.weight"]
    for i in range(LAYERS):
        hf, kx = f"encoder.layer.{i}.", f"encoder/transformer/blocks/{i}/"
        for name in ("query", "key", "value"):
            weight = state_dict[f"{hf}attention.self.{name}.weight"]
            expected[f"{kx}attention/{name}/kernel"] = weight.T.reshape(d, h, d // h)
            expected[f"{kx}attention/{name}/bias"] = state_dict[
                f"{hf}attention.self.{name}.bias"].reshape(h, d // h)
        expected[f"{kx}attention/out/kernel"] = state_dict[
            f"{hf}attention.output.dense.weight"].T.reshape(h, d // h, d)
        expected[f"{kx}attention/out/bias"] = state_dict[f"{hf}attention.output.dense.bias"]
        for kexue_name, hf_name in (("ffn/wi", "intermediate.dense"), ("ffn/wo", "output.dense")):
            expected[f"{kx}{kexue_name}/kernel"] = state_dict[f"{hf}{hf_name}.weight"].T
            expected[f"{kx}{kexue_name}/bias"] = state_dict[f"{hf}{hf_name}.bias"]
        for kexue_name, hf_name in (("attention_norm", "attention.output.LayerNorm"),
                                    ("ffn_norm", "output.LayerNorm")):
            expected[f"{kx}{kexue_name}/scale"] = state_dict[f"{hf}{hf_name}.weight"]
            expected[f"{kx}{kexue_name}/bias"] = state_dict[f"{hf}{hf_name}.bias"]
    return expected


def flat(tree) -> dict[str, np.ndarray]:
    return {parameter_path(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def vocab() -> list[str]:
    return cluener_vocab()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, vocab) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("pretrained")
    seeds = np.random.SeedSequence().generate_state(2)
    return {kind: (root / kind, save_checkpoint(root / kind, kind, vocab, int(seed)))
            for kind, seed in zip(("bert", "roformer"), seeds, strict=True)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


def smoke_config(data_dir: Path, config_file: str = CONFIG, **overrides):
    from experiments import config as experiment_config

    config = experiment_config.load(config_file, preset="smoke", overrides={
        "data.data_dir": str(data_dir), "data.tokenizer": "wordpiece",
        "data.eval_batches": 2, **overrides})
    experiment_config.check(config)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("config_file, kind", [(CONFIG, "bert"), (CONFIG, "roformer"),
                                               ("configs/cluener_multilabel.py", "roformer")])
def test_step_zero_holds_the_checkpoint_in_the_encoder_and_a_fresh_head(config_file, kind,
                                                                         checkpoints, data_dir,
                                                                         vocab):
    from experiments import run as experiment_run
    from kexue.models import initial_params
    from kexue.train import create_train_state

    directory, state_dict = checkpoints[kind]
    run = experiment_run.build(smoke_config(data_dir, config_file,
                                            **{"model.init_from": str(directory)}))
    assert run.data.vocab_file == str(directory / "vocab.txt")
    assert run.train_data.metadata.vocab_size == len(vocab)
    encoder = run.spec.transformer
    assert (encoder.width, encoder.num_layers, encoder.num_heads, encoder.mlp_dim) == (
        WIDTH, LAYERS, HEADS, MLP)
    assert encoder.activation == "gelu_erf" and encoder.norm_epsilon == 1e-12
    assert encoder.dropout_rate == 0.1  # the config's, not the checkpoint's
    messages = []
    state = create_train_state(run.model_factory, run.tx, run.mesh, seed=run.loop.seed,
                               init_params=experiment_run.init_from_pretrained(
                                   run.pretrained, messages.append))
    params, fresh = flat(state.params), flat(initial_params(run.model_factory))
    expected = expected_encoder(state_dict, kind)
    assert set(expected) == {path for path in params if path.startswith("encoder/")}
    for path, value in expected.items():
        np.testing.assert_array_equal(params[path], value.astype(np.float32), err_msg=path)
    head = sorted(path for path in params if not path.startswith("encoder/"))
    assert head, "the task head has parameters"
    for path in head:  # the head keeps the model's own initialisation (here computed
        # eagerly, not compiled: equal up to float32 rounding)
        np.testing.assert_allclose(params[path], fresh[path], rtol=1e-6, atol=1e-8,
                                   err_msg=path)
    (message,) = messages
    assert f"from {directory} ({kind}, safetensors, width 32, 1 layers, 2 heads)" in message
    assert f"left at their initialisation: {', '.join(head)};" in message
    assert (("pooler.dense.bias, pooler.dense.weight" if kind == "bert" else "used: none")
            in message)


def cli(workdir: Path, data_dir: Path, *overrides: str):
    return run_cli("experiments.train", "--config", f"{CONFIG}:smoke", "--workdir",
                   str(workdir), f"--config.data.data_dir={data_dir}",
                   "--config.data.tokenizer=wordpiece", "--config.data.eval_batches=2",
                   *overrides)


@pytest.mark.slow
def test_command_line_fine_tunes_and_resumes_without_reloading(checkpoints, data_dir,
                                                               tmp_path):
    directory, _ = checkpoints["bert"]
    workdir = tmp_path / "run"
    first = cli(workdir, data_dir, f"--config.model.init_from={directory}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("model.init_from: ") == 1, first.stdout[-3000:]
    assert "checkpoint tensors not used: pooler.dense.bias, pooler.dense.weight" in first.stdout
    losses = [r["loss"] for r in records(workdir, "train")]
    assert losses and np.isfinite(losses).all(), losses
    (evaluation,) = records(workdir, "eval")
    assert np.isfinite(evaluation["loss"]) and "dropped_spans" in evaluation
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["init_from"] == str(directory)
    # Resume to step 6: the run's own checkpoint, not the pretrained weights.
    second = cli(workdir, data_dir, f"--config.model.init_from={directory}",
                 "--config.train.num_steps=6", "--config.train.checkpoint_every=2",
                 "--config.train.eval_every=2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "model.init_from: " not in second.stdout
    assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 6
    assert [r["step"] for r in records(workdir, "eval")] == [4, 6]


def rewrite_safetensors(directory: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    save_file(edit(tensors), str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.slow
def test_a_bad_checkpoint_is_one_error_line_from_the_command_line(checkpoints, data_dir,
                                                                   tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["bert"][0], bad)
    rewrite_safetensors(bad, lambda t: {k: v for k, v in t.items()
                                        if k != "encoder.layer.0.output.dense.weight"})
    result = cli(tmp_path / "run", data_dir, f"--config.model.init_from={bad}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("config error")]
    assert line.startswith("config error: config key `model.init_from`: ")
    assert "missing encoder.layer.0.output.dense.weight" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing tensor", "wrong shape", "wrong layout",
                                     "conflicting key", "other vocabulary"])
def test_bad_checkpoints_and_conflicts_name_the_config_key(problem, checkpoints, data_dir,
                                                            tmp_path, vocab):
    from experiments import run as experiment_run

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["bert"][0], bad)
    overrides = {"model.init_from": str(bad)}
    if problem == "missing tensor":
        rewrite_safetensors(bad, lambda t: {k: v for k, v in t.items()
                                            if k != "embeddings.LayerNorm.bias"})
        match = r"`model.init_from`: .*missing embeddings.LayerNorm.bias"
    elif problem == "wrong shape":
        rewrite_safetensors(bad, lambda t: {**t, "encoder.layer.0.intermediate.dense.weight":
                                            t["encoder.layer.0.intermediate.dense.weight"].T})
        match = (r"`model.init_from`: .*encoder.layer.0.intermediate.dense.weight: expected "
                 r"shape \[64, 32\] \(torch Linear weight \[out, in\]\), got \[32, 64\]")
    elif problem == "wrong layout":
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config,
                                                     "position_embedding_type": "relative_key"}))
        match = r"`model.init_from`: .*unsupported bert layout: position_embedding_type"
    elif problem == "conflicting key":
        overrides.update({"model.width": 48, "model.num_heads": 4})
        match = (r"config key `model.init_from`: the pretrained checkpoint fixes these keys; "
                 r"remove or match them: num_heads=4 \(checkpoint: 2\), width=48 "
                 r"\(checkpoint: 32\)")
    else:
        (bad / "small_vocab.txt").write_text("\n".join(vocab[:-3]) + "\n", encoding="utf-8")
        overrides["data.vocab_file"] = str(bad / "small_vocab.txt")
        match = (rf"config key `data.vocab_file`: .*small_vocab.txt has {len(vocab) - 3} tokens;"
                 rf" the checkpoint .* has vocab_size {len(vocab)}")
    with pytest.raises(ValueError, match="(?s)" + match):  # (messages list problems by line)
        experiment_run.build(smoke_config(data_dir, **overrides))


@pytest.mark.parametrize("path, metric", [("configs/cluener_globalpointer.py", "f1"),
                                          ("configs/cluener_multilabel.py", "micro_f1"),
                                          ("configs/cluener_bio.py", "f1")])
@pytest.mark.slow
def test_finetune_presets_mirror_the_reference_setup(path, metric, checkpoints):
    from experiments import config as experiment_config

    with open(Path(CLUENER_DIR) / "train.jsonl", encoding="utf-8") as f:
        assert sum(1 for _ in f) == 10_748  # sentences of the training split
    config = experiment_config.load(path, preset="finetune")
    with pytest.raises(ValueError, match=r"config key `model.mlp_dim`: no value for "
                       r"\['mlp_dim', 'norm_position', 'num_heads', 'num_layers', 'width'\]"):
        experiment_config.check(config)
    directory, _ = checkpoints["roformer"]
    config = experiment_config.load(path, preset="finetune",
                                    overrides={"model.init_from": str(directory)})
    experiment_config.check(config)
    assert experiment_config.data_settings(config)["vocab_file"] == str(directory / "vocab.txt")
    assert config.data.tokenizer == "wordpiece" and config.data.batch_size == 16
    adam = config.optimizer.adamw
    assert config.optimizer.name == "adamw" and adam.learning_rate == 2e-5
    assert (adam.b1, adam.b2, adam.eps, adam.weight_decay) == (0.9, 0.999, 1e-6, 0.0)
    assert adam.schedule == "constant" and config.optimizer.clip_norm == 0.0
    # 10 epochs of ⌈10 748 / 16⌉ = 672 steps, evaluated (and saved) after each
    assert (config.train.num_steps, config.train.eval_every,
            config.train.checkpoint_every) == (6720, 672, 672)
    assert (config.train.best_metric, config.train.best_mode) == (metric, "max")
    char = experiment_config.load(path, preset="smoke",
                                  overrides={"model.init_from": str(directory)})
    with pytest.raises(ValueError, match=r"config key `data.tokenizer`: `model.init_from` "
                       r"needs the checkpoint's vocabulary: expected 'wordpiece'; got 'char'"):
        experiment_config.check(char)
