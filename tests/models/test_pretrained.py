"""Pretrained BERT / RoFormer checkpoints imported into kexue equal Hugging Face's model.

Each test builds a small random `transformers` model, saves it in one format
(safetensors via `save_pretrained`, a PyTorch `pytorch_model.bin` state dict, or a
TensorFlow checkpoint in the original BERT naming written by `tf_bundle_writer`),
imports it with `kexue.models.load_pretrained` and compares hidden states and MLM
logits with the PyTorch model on a padded batch with token types, in float32.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kexue import models
from tests.models import tf_bundle_writer

torch = pytest.importorskip("torch", reason="the Hugging Face comparisons need torch "
                            "(pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="the Hugging Face comparisons "
                                   "need transformers (pip install -e '.[test]')")

V, D, LAYERS, HEADS, MLP, MAX_POSITIONS, TYPES = 61, 32, 2, 4, 48, 24, 3
TOLERANCE = 1e-5

CLASSES = {
    ("bert", True): "BertForMaskedLM", ("bert", False): "BertModel",
    ("roformer", True): "RoFormerForMaskedLM", ("roformer", False): "RoFormerModel",
}


def hf_config(kind: str, **overrides):
    config_class = {"bert": transformers.BertConfig, "roformer": transformers.RoFormerConfig}
    settings = dict(vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=MLP,
                    max_position_embeddings=MAX_POSITIONS, type_vocab_size=TYPES,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings.update(overrides)
    return config_class[kind](**settings)


def random_hf_model(kind: str, rng: np.random.Generator, *, head: bool = True, **overrides):
    """A `transformers` model whose trainable weights are drawn from `rng`."""
    model = getattr(transformers, CLASSES[kind, head])(hf_config(kind, **overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:  # RoFormer's fixed sinusoid table
                continue
            noise = rng.normal(0.0, 0.1, tuple(parameter.shape))
            if name.endswith("LayerNorm.weight"):
                noise += 1.0
            parameter.copy_(torch.from_numpy(noise.astype(np.float32)))
    return model


def random_batch(rng: np.random.Generator, b: int = 3, n: int = 13):
    tokens = rng.integers(0, V, (b, n))
    lengths = np.concatenate([[n], rng.integers(1, n, b - 1)])
    valid = np.arange(n)[None, :] < lengths[:, None]
    types = rng.integers(0, TYPES, (b, n))
    return tokens, valid, types


def hf_outputs(model, tokens, valid, types) -> tuple[np.ndarray, np.ndarray | None]:
    """(last hidden states, MLM logits or None) of the PyTorch model."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), token_type_ids=torch.from_numpy(types),
                    attention_mask=torch.from_numpy(valid.astype(np.int64)),
                    output_hidden_states=True)
    logits = getattr(out, "logits", None)
    return out.hidden_states[-1].numpy(), None if logits is None else logits.numpy()


def max_difference(kexue: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> float:
    """Largest |difference| over the real tokens (padded queries differ by design:
    kexue's padded tokens attend to nothing, Hugging Face's to the real keys)."""
    return float(np.max(np.abs(np.asarray(kexue) - reference)[valid]))


def compare_with_hf(checkpoint: models.PretrainedCheckpoint, hf_model, rng) -> dict:
    tokens, valid, types = random_batch(rng)
    hidden_ref, logits_ref = hf_outputs(hf_model, tokens, valid, types)
    model = models.build_pretrained(checkpoint, dropout_rate=0.0)
    encoder = model.encoder if checkpoint.has_mlm_head else model
    hidden = encoder(jnp.asarray(tokens), valid=jnp.asarray(valid),
                     token_types=jnp.asarray(types))
    assert hidden.dtype == jnp.float32
    differences = {"hidden": max_difference(hidden, hidden_ref, valid)}
    if checkpoint.has_mlm_head:
        logits = model(jnp.asarray(tokens), valid=jnp.asarray(valid),
                       token_types=jnp.asarray(types))
        differences["logits"] = max_difference(logits, logits_ref, valid)
    print(f"{checkpoint.architecture} {checkpoint.format}: max |kexue − HF| {differences}")
    return differences


def save_pytorch_bin(model, directory) -> None:
    """The pre-safetensors Hugging Face layout: `config.json` + `pytorch_model.bin`."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    torch.save(model.state_dict(), str(directory / "pytorch_model.bin"))


def tf_name_and_value(name: str, tensor) -> tuple[str, np.ndarray] | None:
    """A Hugging Face tensor in the original TensorFlow BERT naming and layout."""
    if name.startswith("cls.predictions.decoder.") or name.endswith("embed_positions.weight"):
        return None  # tied copies / RoFormer's sinusoids: not in the TF checkpoints
    value = tensor.detach().numpy()
    name = re.sub(r"^(bert|roformer)\.", "bert.", name)
    name = re.sub(r"layer\.(\d+)\.", r"layer_\1.", name)
    if name == "cls.predictions.bias":
        return "cls/predictions/output_bias", value
    if ".LayerNorm." in name:
        name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
    elif "embeddings." in name and name.endswith(".weight"):
        name = name[: -len(".weight")]
    elif name.endswith(".weight"):
        name, value = name[: -len(".weight")] + ".kernel", value.T  # [out, in] → [in, out]
    return name.replace(".", "/"), np.ascontiguousarray(value)


TF_EXTRAS = {"bert/pooler/dense/kernel": (D, D), "bert/pooler/dense/bias": (D,),
             "cls/seq_relationship/output_weights": (2, D),
             "cls/seq_relationship/output_bias": (2,)}


def save_tensorflow(model, directory, rng, *, extras=True, edit=None) -> None:
    """`bert_config.json` + `bert_model.ckpt.*` as the original BERT / RoFormer releases."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = dict(filter(None, (tf_name_and_value(n, t)
                                 for n, t in model.state_dict().items())))
    if extras:  # what the releases carry besides the encoder and MLM head
        tensors.update({n: rng.normal(size=s).astype(np.float32) for n, s in TF_EXTRAS.items()})
        tensors["global_step"] = np.array(1000000, np.int64)
    if edit is not None:
        edit(tensors)
    tf_bundle_writer.write_checkpoint(str(directory / "bert_model.ckpt"), tensors)
    c = model.config
    (directory / "bert_config.json").write_text(json.dumps({
        "attention_probs_dropout_prob": 0.1, "hidden_act": c.hidden_act,
        "hidden_dropout_prob": 0.1, "hidden_size": c.hidden_size, "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "type_vocab_size": c.type_vocab_size,
        "vocab_size": c.vocab_size}))


# ---------------------------------------------------------------- equality with HF


@pytest.mark.parametrize("kind", ["roformer", "bert"])
@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
def test_hf_checkpoint_matches_pytorch(rng, tmp_path, kind, fmt):
    hf_model = random_hf_model(kind, rng)
    if fmt == "safetensors":
        hf_model.save_pretrained(str(tmp_path))
    else:
        save_pytorch_bin(hf_model, tmp_path)
        reloaded = getattr(transformers, CLASSES[kind, True]).from_pretrained(str(tmp_path))
        tokens, valid, types = random_batch(rng)  # the .bin is a genuine HF checkpoint
        np.testing.assert_array_equal(hf_outputs(reloaded, tokens, valid, types)[1],
                                      hf_outputs(hf_model, tokens, valid, types)[1])
    checkpoint = models.load_pretrained(tmp_path)
    assert (checkpoint.format, checkpoint.architecture) == (fmt, kind)
    assert checkpoint.has_mlm_head and checkpoint.tie_embeddings
    assert checkpoint.unused == ()
    assert checkpoint.config.activation == "gelu_erf"
    assert checkpoint.config.rotary_features == (D // HEADS if kind == "roformer" else 0)
    assert checkpoint.config.max_positions == (MAX_POSITIONS if kind == "bert" else 0)
    differences = compare_with_hf(checkpoint, hf_model, rng)
    assert max(differences.values()) < TOLERANCE, differences


def test_sharded_safetensors_and_legacy_names(rng, tmp_path):
    hf_model = random_hf_model("bert", rng)
    hf_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    checkpoint = models.load_pretrained(tmp_path / "sharded")
    assert checkpoint.unused == ()
    assert max(compare_with_hf(checkpoint, hf_model, rng).values()) < TOLERANCE
    # early Hugging Face files (e.g. bert-base-chinese's .bin) name LayerNorm gamma / beta;
    # the output bias may be stored under its tied name `decoder.bias` only
    legacy = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                     re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", name)): tensor
              for name, tensor in hf_model.state_dict().items()}
    del legacy["cls.predictions.bias"]
    (tmp_path / "legacy").mkdir()
    hf_model.config.save_pretrained(str(tmp_path / "legacy"))
    torch.save(legacy, str(tmp_path / "legacy" / "pytorch_model.bin"))
    checkpoint = models.load_pretrained(tmp_path / "legacy")
    assert checkpoint.unused == ()
    assert max(compare_with_hf(checkpoint, hf_model, rng).values()) < TOLERANCE


@pytest.mark.parametrize("kind", ["roformer", "bert"])
def test_tensorflow_checkpoint_matches_pytorch(rng, tmp_path, kind, caplog):
    hf_model = random_hf_model(kind, rng)
    save_tensorflow(hf_model, tmp_path, rng)
    with caplog.at_level(logging.WARNING):
        checkpoint = models.load_pretrained(tmp_path)
    # bert_config.json has no model type: RoFormer is told by its missing position table
    assert (checkpoint.format, checkpoint.architecture) == ("tensorflow", kind)
    assert checkpoint.has_mlm_head and checkpoint.tie_embeddings
    assert checkpoint.unused == tuple(sorted([*TF_EXTRAS, "global_step"]))
    for name in checkpoint.unused:
        assert name in caplog.text
    differences = compare_with_hf(checkpoint, hf_model, rng)
    assert max(differences.values()) < TOLERANCE, differences


@pytest.mark.parametrize("kind", ["roformer", "bert"])
def test_base_model_checkpoint_imports_as_an_encoder(rng, tmp_path, kind):
    hf_model = random_hf_model(kind, rng, head=False)
    hf_model.save_pretrained(str(tmp_path))
    checkpoint = models.load_pretrained(tmp_path)
    assert not checkpoint.has_mlm_head and checkpoint.model_name == "roformer"
    pooler = ("pooler.dense.bias", "pooler.dense.weight") if kind == "bert" else ()
    assert checkpoint.unused == pooler
    assert isinstance(models.build_pretrained(checkpoint), models.RoFormerEncoder)
    differences = compare_with_hf(checkpoint, hf_model, rng)
    assert differences["hidden"] < TOLERANCE, differences


def test_mlm_head_can_be_left_out(rng, tmp_path):
    random_hf_model("roformer", rng).save_pretrained(str(tmp_path))
    checkpoint = models.load_pretrained(tmp_path, head=False)
    assert not checkpoint.has_mlm_head
    assert checkpoint.unused == ("cls.predictions.bias", "cls.predictions.transform.LayerNorm.bias",
                                 "cls.predictions.transform.LayerNorm.weight",
                                 "cls.predictions.transform.dense.bias",
                                 "cls.predictions.transform.dense.weight")


# ---------------------------------------------------------------- into task models


def test_encoder_weights_load_into_a_globalpointer_model(rng, tmp_path):
    hf_model = random_hf_model("bert", rng)
    hf_model.save_pretrained(str(tmp_path))
    checkpoint = models.load_pretrained(tmp_path)
    config = models.merge_pretrained_config(checkpoint.config, {"dropout_rate": 0.0})
    with nnx.use_eager_sharding(False):
        ner = models.GlobalPointerNER(config, num_types=4, head_dim=8, rngs=nnx.Rngs(1))
    left = models.load_pretrained_params(ner, checkpoint)
    assert sorted(left) == ["key/bias", "key/kernel", "query/bias", "query/kernel"]
    tokens, valid, types = random_batch(rng)
    hidden_ref, _ = hf_outputs(hf_model, tokens, valid, np.zeros_like(types))
    hidden = ner.encoder(jnp.asarray(tokens), valid=jnp.asarray(valid))  # token type 0
    assert max_difference(hidden, hidden_ref, valid) < TOLERANCE
    # the same through a `config.model` section and the factory
    mlm = models.build_model(checkpoint.model_spec(dropout_rate=0.0), rngs=nnx.Rngs(2))
    assert models.load_pretrained_params(mlm, checkpoint) == ()


def test_architecture_conflicts_are_listed(rng, tmp_path):
    random_hf_model("roformer", rng).save_pretrained(str(tmp_path))
    checkpoint = models.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_layers=4 \(checkpoint: 2\), "
                                         r"width=64 \(checkpoint: 32\)"):
        models.merge_pretrained_config(checkpoint.config, {"width": 64, "num_layers": 4,
                                                            "dtype": "bfloat16"})
    other = models.merge_pretrained_config(checkpoint.config, {"dtype": "bfloat16"})
    assert other.dtype == "bfloat16" and other.width == D
    with nnx.use_eager_sharding(False):
        wider = models.RoFormerEncoder(models.TransformerConfig(
            width=64, num_layers=LAYERS, num_heads=HEADS, mlp_dim=MLP, vocab_size=V),
            rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="width: model 64, checkpoint 32"):
        models.load_pretrained_params(wider, checkpoint)


# ---------------------------------------------------------------- bad checkpoints


def test_missing_and_misshapen_tensors_are_listed_together(rng, tmp_path):
    from safetensors.numpy import save_file

    hf_model = random_hf_model("bert", rng)
    hf_model.config.save_pretrained(str(tmp_path))
    tensors = {n: t.detach().numpy().copy() for n, t in hf_model.state_dict().items()
               if not n.startswith("cls.predictions.decoder.")}
    del tensors["bert.encoder.layer.1.attention.self.key.bias"]
    del tensors["bert.embeddings.position_embeddings.weight"]
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)  # [in, out]: the TF layout
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="3 problem") as error:
        models.load_pretrained(tmp_path)
    message = str(error.value)
    assert "missing bert.encoder.layer.1.attention.self.key.bias" in message
    assert "missing bert.embeddings.position_embeddings.weight" in message
    assert (f"{name}: expected shape [{MLP}, {D}] (torch Linear weight [out, in]), "
            f"got [{D}, {MLP}]") in message


def test_tensorflow_kernel_in_torch_layout_is_a_shape_error(rng, tmp_path):
    def transpose_ffn(tensors):
        name = "bert/encoder/layer_1/output/dense/kernel"
        tensors[name] = np.ascontiguousarray(tensors[name].T)

    save_tensorflow(random_hf_model("roformer", rng), tmp_path, rng, edit=transpose_ffn)
    with pytest.raises(ValueError, match=re.escape(
            f"bert/encoder/layer_1/output/dense/kernel: expected shape [{MLP}, {D}] "
            f"(TF dense kernel [in, out]), got [{D}, {MLP}]")):
        models.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kind", "overrides", "message"),
    [
        ("roformer", {"rotary_value": True}, "rotary_value=true"),
        ("roformer", {"embedding_size": 16}, "embedding_size 16 != hidden_size 32"),
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("bert", {"hidden_act": "tanh"}, "hidden_act 'tanh'"),
    ],
)
def test_unsupported_layouts_are_named(rng, tmp_path, kind, overrides, message):
    random_hf_model(kind, rng, **overrides).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=f"unsupported {kind} layout: .*{message}"):
        models.load_pretrained(tmp_path)


def test_rope_table_of_another_layout_is_rejected(rng, tmp_path):
    from safetensors.numpy import load_file, save_file

    random_hf_model("roformer", rng).save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "roformer.encoder.embed_positions.weight"
    table = tensors[name]  # [sin | cos] halves → pairs interleaved (another layout)
    half = table.shape[1] // 2
    tensors[name] = np.stack([table[:, :half], table[:, half:]], -1).reshape(table.shape)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not hold the interleaved RoPE sinusoids"):
        models.load_pretrained(tmp_path)


def test_tensorflow_embedding_projection_is_rejected(rng, tmp_path):
    def add_projection(tensors):
        tensors["bert/encoder/embedding_hidden_mapping_in/kernel"] = np.zeros((D, D), np.float32)

    save_tensorflow(random_hf_model("bert", rng), tmp_path, rng, edit=add_projection)
    with pytest.raises(ValueError, match="factorised embedding projection"):
        models.load_pretrained(tmp_path)


def test_pytorch_format_without_torch_is_a_clear_error(rng, tmp_path, monkeypatch):
    save_pytorch_bin(random_hf_model("bert", rng), tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"PyTorch `.bin` checkpoints needs `torch`"):
        models.load_pretrained(tmp_path)


def test_paths_without_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="expected a checkpoint in"):
        models.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="format: expected one of"):
        models.load_pretrained(tmp_path, format="onnx")


def test_importing_kexue_loads_no_checkpoint_library():
    import subprocess

    code = ("import sys, kexue.models, kexue.data\n"
            "print([m for m in ('torch', 'transformers', 'safetensors', 'tokenizers', "
            "'google_crc32c') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_readme_example_runs_on_a_small_release(rng, tmp_path):
    """The README's example, on a tiny random RoFormer laid out as the TF release."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Starting from a pretrained"):
                     readme.index("## Using the ops")]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    release = tmp_path / "chinese_roformer-char_L-12_H-768_A-12"
    save_tensorflow(random_hf_model("roformer", rng), release, rng)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"彭小军认为，国内银行"]
    words += [chr(0x4E00 + i) for i in range(V - len(words))]
    (release / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, check=False, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"roformer tensorflow {D} (")
