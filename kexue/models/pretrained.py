"""Import pretrained BERT / RoFormer checkpoints into the kexue RoFormer encoder.

    from kexue import models
    ckpt = models.load_pretrained("chinese_roformer_char_L-12_H-768_A-12")  # a directory
    ckpt.config, ckpt.architecture, ckpt.format, ckpt.has_mlm_head, ckpt.unused
    mlm = models.build_pretrained(ckpt, rngs=nnx.Rngs(0))      # RoFormerMLM, weights set
    # or any encoder model built from the checkpoint's architecture:
    config = models.merge_pretrained_config(ckpt.config, {"dropout_rate": 0.1})
    ner = models.GlobalPointerNER(config, num_types=10, rngs=nnx.Rngs(0))
    models.load_pretrained_params(ner, ckpt)                    # encoder weights set

Formats (`format=`, detected from the files when None):

* ``"safetensors"``: Hugging Face `model.safetensors` (or its sharded index) with
  `config.json`, read by the `safetensors` package (NumPy API, no PyTorch).
* ``"pytorch"``: Hugging Face `pytorch_model.bin` (or its sharded index) with
  `config.json`; needs `torch`.
* ``"tensorflow"``: the original TensorFlow checkpoints that bert4keras loads,
  `bert_model.ckpt.{index,data-*}` with `bert_config.json`, read by
  `kexue.models.tf_checkpoint` without TensorFlow.

Architectures: BERT (Devlin et al., 2019: learned absolute positions, token types)
and RoFormer (kexue.fm/archives/8265: interleaved RoPE with base 10000 instead of
position embeddings, token types), both post-LayerNorm with biases; Hugging Face's
`BertModel` / `BertForMaskedLM` / `RoFormerModel` / `RoFormerForMaskedLM` weights.
The MLM head (`cls/predictions/*`) is imported when present. "gelu" in these
configs is the exact erf GELU (Hugging Face and bert4keras read it so), kexue's
``"gelu_erf"``; ``"gelu_new"`` is kexue's tanh ``"gelu"``.

Every tensor of the kexue model must come from the checkpoint with the expected
shape: missing tensors and shape mismatches are collected and raised together in
one `ValueError`. Checkpoint tensors the kexue model does not use (the pooler, the
next-sentence head, optimizer slots, ...) are returned in `unused` and logged.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging
from flax import nnx

from kexue.models.config import TransformerConfig
from kexue.models.factory import ModelSpec
from kexue.models.roformer import RoFormerEncoder, RoFormerMLM
from kexue.models.tf_checkpoint import TFCheckpoint

__all__ = [
    "FORMATS",
    "RUNTIME_KEYS",
    "PretrainedCheckpoint",
    "build_pretrained",
    "checkpoint_vocab_file",
    "load_pretrained",
    "load_pretrained_params",
    "merge_pretrained_config",
]

FORMATS = ("safetensors", "pytorch", "tensorflow")
ARCHITECTURES = ("bert", "roformer")
#: `TransformerConfig` fields a pretrained model may change (they do not change the
#: parameters or, except for dropout and precision, the function computed); every
#: other field is fixed by the checkpoint. `attention_scale` / `entropy_base` are
#: included: the entropy-invariant scale can be applied to a trained model
#: (kexue.fm/archives/8823).
RUNTIME_KEYS = ("dropout_rate", "dtype", "param_dtype", "remat", "attention_implementation",
                "init_std", "attention_scale", "entropy_base")

#: Hugging Face / bert4keras activation names → `TransformerConfig.activation`.
_ACTIVATIONS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ROPE_BASE = 10000.0

Path = tuple[str | int, ...]


# --------------------------------------------------------------------------- sources


class _Tensors(Protocol):
    """Named tensors of one checkpoint (read lazily)."""

    names: tuple[str, ...]

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray: ...


class _SafetensorsFiles:
    def __init__(self, files: list[str]):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ImportError("reading .safetensors checkpoints needs the `safetensors` "
                              "package: pip install 'kexue[pretrained]'") from None
        self._files = {}
        for file in files:
            handle = safe_open(file, framework="numpy")
            for name in handle.keys():
                self._files[name] = handle
        self.names = tuple(sorted(self._files))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[name].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        try:
            return self._files[name].get_tensor(name)
        except (TypeError, ValueError) as error:  # e.g. bfloat16, which NumPy lacks
            raise ValueError(f"safetensors tensor {name!r} cannot be read as a NumPy array "
                             f"({error}); convert the checkpoint to float32") from None


class _TorchFiles:
    def __init__(self, files: list[str]):
        try:
            import torch
        except ImportError:
            raise ImportError("reading PyTorch `.bin` checkpoints needs `torch`: pip "
                              "install 'kexue[pretrained-torch]' (.safetensors and "
                              "TensorFlow checkpoints do not)") from None
        self._tensors = {}
        for file in files:
            state = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise ValueError(f"{file}: expected a PyTorch state dict (name → tensor); "
                                 f"got {type(state).__name__}")
            self._tensors.update(state)
        self.names = tuple(sorted(self._tensors))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        import torch

        tensor = self._tensors[name].detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()


# --------------------------------------------------------------------------- locating


def _shard_files(index_file: str) -> list[str]:
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise ValueError(f"{index_file}: expected a sharded-checkpoint index with a "
                         "non-empty `weight_map`")
    directory = os.path.dirname(index_file)
    return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]


def _tf_prefixes(directory: str) -> list[str]:
    return sorted(p[: -len(".index")] for p in glob.glob(os.path.join(directory, "*.index"))
                  if glob.glob(p[: -len(".index")] + ".data-*"))


def _locate(path: str, format: str | None) -> tuple[str, list[str], str]:
    """`(format, weight files or [TF prefix], directory)` for `path`."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)} or None; got {format!r}")
    if os.path.isdir(path):
        directory = path
        found: dict[str, list[str]] = {}
        for fmt, single, sharded in (("safetensors", "model.safetensors",
                                      "model.safetensors.index.json"),
                                     ("pytorch", "pytorch_model.bin",
                                      "pytorch_model.bin.index.json")):
            if os.path.isfile(os.path.join(path, single)):
                found[fmt] = [os.path.join(path, single)]
            elif os.path.isfile(os.path.join(path, sharded)):
                found[fmt] = _shard_files(os.path.join(path, sharded))
        prefixes = _tf_prefixes(path)
        if len(prefixes) > 1 and format in (None, "tensorflow"):
            raise ValueError(f"path: {path} holds several TensorFlow checkpoints "
                             f"{[os.path.basename(p) for p in prefixes]}; pass one prefix")
        if prefixes:
            found["tensorflow"] = prefixes
        order = [format] if format else ["safetensors", "tensorflow", "pytorch"]
        for fmt in order:
            if fmt in found:
                return fmt, found[fmt], directory
        wanted = f"a {format} checkpoint" if format else "a checkpoint"
        raise FileNotFoundError(
            f"path: expected {wanted} in {path} (model.safetensors, pytorch_model.bin, "
            f"or a TensorFlow prefix such as bert_model.ckpt.index + .data-*); found "
            f"{sorted(os.listdir(path))}")
    directory = os.path.dirname(path) or "."
    if path.endswith(".index") or os.path.isfile(path + ".index"):
        prefix = path[: -len(".index")] if path.endswith(".index") else path
        detected = "tensorflow"
        files = [prefix]
    elif path.endswith(".safetensors"):
        detected, files = "safetensors", [path]
    elif path.endswith((".bin", ".pt", ".pth")):
        detected, files = "pytorch", [path]
    elif path.endswith(".safetensors.index.json"):
        detected, files = "safetensors", _shard_files(path)
    elif path.endswith(".bin.index.json"):
        detected, files = "pytorch", _shard_files(path)
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"path: {path} does not exist")
        raise ValueError(f"path: cannot tell the format of {path}; expected a directory, a "
                         ".safetensors or .bin file, or a TensorFlow checkpoint prefix")
    if format is not None and format != detected:
        raise ValueError(f"format: {path} is a {detected} checkpoint; got format={format!r}")
    for file in files if detected != "tensorflow" else [files[0] + ".index"]:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"path: {file} does not exist")
    return detected, files, directory


def _read_config(directory: str, fmt: str, config_file: str | None) -> tuple[dict, str]:
    if config_file is None:
        names = (["bert_config.json", "config.json"] if fmt == "tensorflow"
                 else ["config.json"])
        candidates = [os.path.join(directory, name) for name in names]
        config_file = next((c for c in candidates if os.path.isfile(c)), None)
        if config_file is None:
            raise FileNotFoundError(f"config_file: no {' or '.join(names)} in {directory}; "
                                    "pass config_file=")
    with open(config_file, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}: not JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    return config, config_file


# --------------------------------------------------------------------------- config


def _architecture(config: dict, tensors: _Tensors, fmt: str, where: str,
                  requested: str | None) -> str:
    if requested is not None:
        if requested not in ARCHITECTURES:
            raise ValueError(f"architecture: expected one of {list(ARCHITECTURES)} or "
                             f"None; got {requested!r}")
        return requested
    model_type = config.get("model_type")
    if model_type is not None:
        if model_type not in ARCHITECTURES:
            raise ValueError(f"{where}: model_type {model_type!r} is not supported; expected "
                             f"one of {list(ARCHITECTURES)}")
        return model_type
    if fmt != "tensorflow":
        raise ValueError(f"{where}: no `model_type`; pass architecture='bert' or 'roformer'")
    # bert_config.json does not say; RoFormer checkpoints have no position table.
    has_positions = any(n.endswith("embeddings/position_embeddings") for n in tensors.names)
    return "bert" if has_positions else "roformer"


def _transformer_config(config: dict, architecture: str, where: str) -> tuple[TransformerConfig,
                                                                              bool]:
    """`(TransformerConfig, tie_embeddings)` from a BERT / RoFormer JSON config."""
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [key for key in required if key not in config]
    if architecture == "bert" and "max_position_embeddings" not in config:
        missing.append("max_position_embeddings")
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    problems = []
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        problems.append(f"hidden_act {act!r} (supported: {sorted(_ACTIVATIONS)})")
    embedding_size = config.get("embedding_size")
    if embedding_size not in (None, config["hidden_size"]):
        problems.append(f"embedding_size {embedding_size} != hidden_size "
                        f"{config['hidden_size']} (a factorised embedding projection)")
    if config.get("rotary_value", False):
        problems.append("rotary_value=true (RoPE on the values)")
    if config.get("position_embedding_type", "absolute") not in ("absolute", None):
        problems.append(f"position_embedding_type {config['position_embedding_type']!r}")
    if config.get("is_decoder", False) or config.get("add_cross_attention", False):
        problems.append("is_decoder / add_cross_attention (a decoder, not an encoder)")
    if problems:
        raise ValueError(f"{where}: unsupported {architecture} layout: " + "; ".join(problems))
    tie = config.get("tie_word_embeddings", True)
    common = dict(
        width=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], mlp_dim=config["intermediate_size"],
        vocab_size=config["vocab_size"], activation=_ACTIVATIONS[act], norm="layernorm",
        norm_position="post", norm_epsilon=float(config.get("layer_norm_eps", 1e-12)),
        use_bias=True, type_vocab_size=config.get("type_vocab_size", 2),
        dropout_rate=float(config.get("hidden_dropout_prob", 0.1)),
        init_std=float(config.get("initializer_range", 0.02)))
    if architecture == "bert":
        specific = dict(max_positions=config["max_position_embeddings"], rotary_dim=0)
    else:
        specific = dict(rope_layout="interleaved", rope_base=_ROPE_BASE)
    try:
        return TransformerConfig(**common, **specific), bool(tie)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def merge_pretrained_config(config: TransformerConfig,
                            overrides: Mapping[str, Any]) -> TransformerConfig:
    """The checkpoint's `config` with `overrides` (`config.model`-style keys) applied.

    Only `RUNTIME_KEYS` may change; another key is accepted when it equals the
    checkpoint's value and is an error otherwise (all conflicts in one message).
    """
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"`overrides`: {unknown} are not TransformerConfig fields")
    conflicts = [f"{key}={value!r} (checkpoint: {getattr(config, key)!r})"
                 for key, value in sorted(overrides.items())
                 if key not in RUNTIME_KEYS and value != getattr(config, key)]
    if conflicts:
        raise ValueError("`overrides`: the pretrained checkpoint fixes these keys; remove or "
                         f"match them: {', '.join(conflicts)} (changeable: {list(RUNTIME_KEYS)})")
    return dataclasses.replace(config, **dict(overrides))


# --------------------------------------------------------------------------- tensor map


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One kexue parameter and where it comes from."""

    target: Path                 # path in a `RoFormerMLM`'s parameter state
    names: tuple[str, ...]       # alternative checkpoint names (first present is used)
    source_shape: tuple[int, ...]
    layout: str                  # how the checkpoint stores it (for error messages)
    convert: Callable[[np.ndarray], np.ndarray]


def _names(fmt: str, prefix: str, module: str, leaf: str) -> tuple[str, ...]:
    """Checkpoint names of `leaf` of `module` (module in TF spelling, `/`-separated)."""
    if fmt == "tensorflow":
        base = prefix + module
        return {"table": (base,), "kernel": (base + "/kernel",), "bias": (base + "/bias",),
                "gamma": (base + "/gamma",), "beta": (base + "/beta",)}[leaf]
    parts = []
    for part in module.split("/"):
        parts.extend(part.split("_", 1) if part.startswith("layer_") else [part])
    base = prefix + ".".join(parts)
    return {"table": (base + ".weight",), "kernel": (base + ".weight",),
            "bias": (base + ".bias",), "gamma": (base + ".weight", base + ".gamma"),
            "beta": (base + ".bias", base + ".beta")}[leaf]


def _specs(c: TransformerConfig, architecture: str, fmt: str, prefix: str, head: bool,
           tie: bool) -> list[_Spec]:
    d, h, hd, f, v = c.width, c.num_heads, c.head_dim, c.mlp_dim, c.vocab_size
    torch_layout = fmt != "tensorflow"
    specs: list[_Spec] = []

    def table(module: str, target: Path, rows: int) -> None:
        specs.append(_Spec(target, _names(fmt, prefix, module, "table"), (rows, d),
                           "table [rows, width]", np.asarray))

    def norm(module: str, target: Path, pre: str = prefix) -> None:
        for leaf, name in (("gamma", "scale"), ("beta", "bias")):
            specs.append(_Spec((*target, name), _names(fmt, pre, module, leaf), (d,),
                               "vector [width]", np.asarray))

    def linear(module: str, target: Path, n_in: int, in_shape: tuple, n_out: int,
               out_shape: tuple, pre: str = prefix) -> None:
        if torch_layout:  # torch.nn.Linear stores [out, in]
            source, layout = (n_out, n_in), "torch Linear weight [out, in]"

            def convert(x):
                return np.asarray(x).T.reshape(in_shape + out_shape)
        else:
            source, layout = (n_in, n_out), "TF dense kernel [in, out]"

            def convert(x):
                return np.asarray(x).reshape(in_shape + out_shape)
        specs.append(_Spec((*target, "kernel"), _names(fmt, pre, module, "kernel"), source,
                           layout, convert))
        specs.append(_Spec((*target, "bias"), _names(fmt, pre, module, "bias"), (n_out,),
                           "bias [out]", lambda x, s=out_shape: np.asarray(x).reshape(s)))

    enc: Path = ("encoder",)
    table("embeddings/word_embeddings", (*enc, "embed", "embedding"), v)
    if architecture == "bert":
        table("embeddings/position_embeddings", (*enc, "position_embed", "embedding"),
              c.max_positions)
    if c.type_vocab_size:
        table("embeddings/token_type_embeddings", (*enc, "type_embed", "embedding"),
              c.type_vocab_size)
    norm("embeddings/LayerNorm", (*enc, "transformer", "norm"))
    for i in range(c.num_layers):
        layer, block = f"encoder/layer_{i}/", (*enc, "transformer", "blocks", i)
        for name in ("query", "key", "value"):
            linear(layer + "attention/self/" + name, (*block, "attention", name), d, (d,),
                   d, (h, hd))
        linear(layer + "attention/output/dense", (*block, "attention", "out"), d, (h, hd), d,
               (d,))
        norm(layer + "attention/output/LayerNorm", (*block, "attention_norm"))
        linear(layer + "intermediate/dense", (*block, "ffn", "wi"), d, (d,), f, (f,))
        linear(layer + "output/dense", (*block, "ffn", "wo"), f, (f,), d, (d,))
        norm(layer + "output/LayerNorm", (*block, "ffn_norm"))
    if head:
        head_prefix = "cls/predictions/" if fmt == "tensorflow" else "cls.predictions."
        linear("transform/dense", ("transform",), d, (d,), d, (d,), pre=head_prefix)
        norm("transform/LayerNorm", ("transform_norm",), pre=head_prefix)
        # Hugging Face ties `decoder.bias` to `bias` and may store either name.
        biases = (("cls/predictions/output_bias",) if fmt == "tensorflow"
                  else ("cls.predictions.bias", "cls.predictions.decoder.bias"))
        specs.append(_Spec(("output_bias",), biases, (v,), "vector [vocab]", np.asarray))
        if not tie:
            specs.append(_Spec(("decoder", "kernel"), (head_prefix + "decoder.weight",),
                               (v, d), "torch Linear weight [out, in]",
                               lambda x: np.asarray(x).T))
    return specs


def _encoder_prefix(fmt: str, names: tuple[str, ...], architecture: str) -> str:
    """The prefix of the encoder's names (`bert/`, `bert.`, `roformer.` or none)."""
    suffix = ("embeddings/word_embeddings" if fmt == "tensorflow"
              else "embeddings.word_embeddings.weight")
    candidates = (["bert/", "roformer/", ""] if fmt == "tensorflow"
                  else [f"{architecture}.", ""])
    for prefix in candidates:
        if prefix + suffix in names:
            return prefix
    return candidates[0]  # reported as missing below


def _sinusoid_table(positions: int, head_dim: int) -> np.ndarray:
    """Hugging Face RoFormer's stored table: `[sin(m θ_i) | cos(m θ_i)]`, `θ_i = 10⁴^(−2i/d)`."""
    angles = (np.arange(positions, dtype=np.float64)[:, None]
              * _ROPE_BASE ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def _extra_checks(tensors: _Tensors, c: TransformerConfig, architecture: str, fmt: str,
                  prefix: str, problems: list[str]) -> set[str]:
    """Checks of tensors that carry no parameter; returns the names they account for."""
    consumed = set()
    embedding_projection = (("encoder/embedding_hidden_mapping_in/kernel",) if fmt == "tensorflow"
                            else ("embeddings_project.weight",))
    for name in embedding_projection:
        if prefix + name in tensors.names:
            problems.append(f"{prefix + name}: a factorised embedding projection "
                            "(embedding size != width) is not supported")
    table = prefix + "encoder.embed_positions.weight"
    if architecture == "roformer" and fmt != "tensorflow" and table in tensors.names:
        # Hugging Face stores the sinusoids RoPE rotates by; they must be kexue's RoPE.
        stored = np.asarray(tensors.read(table), np.float64)
        expected = _sinusoid_table(stored.shape[0], c.head_dim)
        if stored.shape != expected.shape or not np.allclose(stored, expected, atol=1e-3):
            problems.append(f"{table}: {list(stored.shape)} does not hold the interleaved "
                            f"RoPE sinusoids of base {_ROPE_BASE:g} and head dim {c.head_dim}")
        consumed.add(table)
    return consumed


# --------------------------------------------------------------------------- checkpoint


@dataclasses.dataclass(frozen=True)
class PretrainedCheckpoint:
    """A checkpoint converted to kexue: its architecture and its parameters.

    Attributes:
      path: what was loaded (directory, file or TensorFlow prefix).
      format: ``"safetensors" | "pytorch" | "tensorflow"``.
      architecture: ``"bert" | "roformer"``.
      config: the `TransformerConfig` the weights need (post-LayerNorm, biases; BERT:
        `max_positions`, `rotary_dim=0`; RoFormer: interleaved RoPE, base 10000).
      tie_embeddings: the MLM head's output layer is the token embedding.
      params: kexue parameter path (as in `nnx.state(RoFormerMLM)`, e.g.
        `("encoder", "transformer", "blocks", 0, "attention", "query", "kernel")`) →
        float32 array in kexue's layout.
      unused: checkpoint tensors no kexue parameter came from (also logged).
      vocab_file: `vocab.txt` next to the checkpoint, or None.
    """

    path: str
    format: str
    architecture: str
    config: TransformerConfig
    tie_embeddings: bool
    params: Mapping[Path, np.ndarray]
    unused: tuple[str, ...]
    vocab_file: str | None = None

    @property
    def has_mlm_head(self) -> bool:
        return ("output_bias",) in self.params

    @property
    def model_name(self) -> str:
        """The `ModelSpec` name of the model these weights fill completely."""
        return "roformer_mlm" if self.has_mlm_head else "roformer"

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of that model besides the config."""
        return {"tie_embeddings": self.tie_embeddings} if self.has_mlm_head else {}

    def model_spec(self, **overrides: Any) -> ModelSpec:
        """The `ModelSpec` (for `build_model`) of this model; `overrides` as
        `merge_pretrained_config`."""
        return ModelSpec(self.model_name, merge_pretrained_config(self.config, overrides),
                         self.model_kwargs)


def load_pretrained(path: str | os.PathLike, *, format: str | None = None,
                    architecture: str | None = None, config_file: str | None = None,
                    head: bool | None = None,
                    verify_checksums: bool = True) -> PretrainedCheckpoint:
    """Reads a BERT / RoFormer checkpoint and converts it to kexue's layout.

    Args:
      path: a checkpoint directory (Hugging Face: `config.json` + `model.safetensors`
        or `pytorch_model.bin`; TensorFlow: `bert_config.json` + `bert_model.ckpt.*`),
        a weights file, or a TensorFlow checkpoint prefix.
      format: ``"safetensors" | "pytorch" | "tensorflow"``, or None to detect (a
        directory with several: safetensors, then TensorFlow, then PyTorch).
      architecture: ``"bert" | "roformer"``, or None: the config's `model_type`;
        for TensorFlow configs, which have none, BERT iff the checkpoint has a
        position-embedding table.
      config_file: the JSON config (default: `config.json`, or `bert_config.json`
        for TensorFlow, next to the weights).
      head: import the MLM head (True: required, False: skipped and its tensors
        reported unused, None: when the checkpoint has one).
      verify_checksums: check TensorFlow CRC-32C checksums (needs `google-crc32c`).

    Raises:
      FileNotFoundError: no checkpoint or config where `path` points.
      ImportError: the reader of the format is not installed (the message names it).
      ValueError: an unsupported configuration, or tensors that are missing or have
        the wrong shape (all of them listed in one message).
    """
    path = os.fspath(path)
    fmt, files, directory = _locate(path, format)
    config_dict, config_path = _read_config(directory, fmt, config_file)
    if fmt == "tensorflow":
        tensors: _Tensors = TFCheckpoint(files[0], verify_checksums=verify_checksums)
    elif fmt == "safetensors":
        tensors = _SafetensorsFiles(files)
    else:
        tensors = _TorchFiles(files)
    arch = _architecture(config_dict, tensors, fmt, config_path, architecture)
    config, tie = _transformer_config(config_dict, arch, config_path)
    prefix = _encoder_prefix(fmt, tensors.names, arch)
    head_name = ("cls/predictions/transform/dense/kernel" if fmt == "tensorflow"
                 else "cls.predictions.transform.dense.weight")
    if head is None:
        head = head_name in tensors.names
    if fmt == "tensorflow":
        tie = True  # the original BERT / RoFormer MLM heads reuse the token embedding
    specs = _specs(config, arch, fmt, prefix, head, tie)

    problems: list[str] = []
    consumed = _extra_checks(tensors, config, arch, fmt, prefix, problems)
    params: dict[Path, np.ndarray] = {}
    present = set(tensors.names)
    for spec in specs:
        name = next((n for n in spec.names if n in present), None)
        if name is None:
            problems.append(f"missing {' or '.join(spec.names)} ({spec.layout} "
                            f"{list(spec.source_shape)})")
            continue
        shape = tensors.shape(name)
        if shape != spec.source_shape:
            problems.append(f"{name}: expected shape {list(spec.source_shape)} "
                            f"({spec.layout}), got {list(shape)}")
            continue
        consumed.add(name)
        params[spec.target] = np.asarray(spec.convert(tensors.read(name)), np.float32)
    if problems:
        raise ValueError(f"{path}: cannot import this {arch} checkpoint ({fmt}) into "
                         f"kexue's RoFormer encoder: {len(problems)} problem(s):\n  "
                         + "\n  ".join(problems))
    consumed |= _tied_duplicates(tensors, fmt, prefix, head, tie, params)
    unused = tuple(sorted(present - consumed))
    if unused:
        logging.warning("%s: %d checkpoint tensor(s) not used by the kexue model: %s", path,
                        len(unused), ", ".join(unused))
    return PretrainedCheckpoint(path=path, format=fmt, architecture=arch, config=config,
                                tie_embeddings=tie, params=params, unused=unused,
                                vocab_file=checkpoint_vocab_file(path))


def checkpoint_vocab_file(path: str | os.PathLike) -> str | None:
    """The `vocab.txt` next to a checkpoint (`path` as in `load_pretrained`: a
    directory, a weights file or a TensorFlow prefix), or None when there is none.
    Reads nothing but the directory listing."""
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    vocab = os.path.join(directory, "vocab.txt")
    return vocab if os.path.isfile(vocab) else None


def _tied_duplicates(tensors: _Tensors, fmt: str, prefix: str, head: bool, tie: bool,
                     params: Mapping[Path, np.ndarray]) -> set[str]:
    """Copies of tied tensors (Hugging Face may store them): used when equal.

    The decoder weight equals the token embedding when tied, and the decoder bias the
    output bias; a copy that differs is left unused (and so reported).
    """
    if fmt == "tensorflow" or not head:
        return set()
    copies = {"cls.predictions.decoder.bias": params[("output_bias",)]}
    if tie:
        copies["cls.predictions.decoder.weight"] = params[("encoder", "embed", "embedding")]
    consumed = set()
    for name, value in copies.items():
        if name in tensors.names and tensors.shape(name) == value.shape and np.array_equal(
                np.asarray(tensors.read(name), np.float32), value):
            consumed.add(name)
    return consumed


# --------------------------------------------------------------------------- loading


def _encoder_root(model: nnx.Module) -> Path:
    if isinstance(model, RoFormerEncoder):
        return ()
    if isinstance(getattr(model, "encoder", None), RoFormerEncoder):
        return ("encoder",)
    raise ValueError(f"model: expected a RoFormerEncoder or a model with a RoFormerEncoder "
                     f"`encoder`; got {type(model).__name__}")


def load_pretrained_params(model: nnx.Module, checkpoint: PretrainedCheckpoint, *,
                           head: bool | None = None) -> tuple[str, ...]:
    """Sets `model`'s encoder (and MLM head) parameters from `checkpoint`, in place.

    Works for `RoFormerEncoder` and every model with a RoFormer `encoder`
    (`RoFormerMLM`, `GlobalPointerNER`, `BIOTagger`, `MultiLabelClassifier`), built
    with an architecture equal to the checkpoint's (`merge_pretrained_config`).
    Values are cast to each parameter's dtype and placed with its sharding.

    Args:
      head: also set a `RoFormerMLM`'s head (None: when both have one).

    Returns:
      The paths (`/`-joined) of the model's parameters left as initialised (e.g.
      the GlobalPointer head), for the caller to log.

    Raises:
      ValueError: an architecture that differs from the checkpoint's, or parameters
        whose shapes differ (all listed).
    """
    root = _encoder_root(model)
    config = model.encoder.config if root else model.config
    differ = [f"{f.name}: model {getattr(config, f.name)!r}, checkpoint "
              f"{getattr(checkpoint.config, f.name)!r}"
              for f in dataclasses.fields(TransformerConfig)
              if f.name not in RUNTIME_KEYS
              and getattr(config, f.name) != getattr(checkpoint.config, f.name)]
    if differ:
        raise ValueError("model: its architecture differs from the checkpoint's ("
                         + "; ".join(differ) + "); build it from merge_pretrained_config("
                         "checkpoint.config, ...)")
    is_mlm = isinstance(model, RoFormerMLM)
    if head is None:
        head = is_mlm and checkpoint.has_mlm_head
    if head and not (is_mlm and checkpoint.has_mlm_head):
        raise ValueError(f"head: True needs a RoFormerMLM model and a checkpoint with an MLM "
                         f"head; got {type(model).__name__} and a checkpoint "
                         f"{'with' if checkpoint.has_mlm_head else 'without'} one")
    if head and (model.decoder is None) != checkpoint.tie_embeddings:
        raise ValueError(f"model: tie_embeddings={model.decoder is None} but the checkpoint's "
                         f"MLM head has tie_embeddings={checkpoint.tie_embeddings}")
    wanted: dict[Path, np.ndarray] = {}
    for path, value in checkpoint.params.items():
        if path[0] == "encoder":
            wanted[root + path[1:]] = value
        elif head:
            wanted[path] = value
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    problems = [f"{'/'.join(map(str, p))}: not in the model" for p in wanted
                if p not in state]
    problems += [f"{'/'.join(map(str, p))}: model {list(state[p].shape)}, checkpoint "
                 f"{list(v.shape)}" for p, v in wanted.items()
                 if p in state and tuple(state[p].shape) != v.shape]
    if problems:
        raise ValueError("checkpoint: parameters do not fit the model:\n  "
                         + "\n  ".join(problems))
    for path, value in wanted.items():
        variable = state[path]
        current = variable.get_value()
        new = value.astype(current.dtype)
        sharding = getattr(current, "sharding", None)
        variable.set_value(jax.device_put(new, sharding) if sharding is not None
                           else jax.numpy.asarray(new))
    return tuple("/".join(map(str, p)) for p in state if p not in wanted)


def build_pretrained(checkpoint: PretrainedCheckpoint, *, rngs: nnx.Rngs | None = None,
                     head: bool | None = None, **overrides: Any) -> nnx.Module:
    """`RoFormerMLM` (with the head) or `RoFormerEncoder` holding the checkpoint's weights.

    Args:
      head: build the MLM model (default: when the checkpoint has a head).
      rngs: for dropout (default `nnx.Rngs(0)`); no parameter is left random.
      **overrides: `RUNTIME_KEYS` of the config (e.g. ``dropout_rate=0.0``,
        ``dtype="bfloat16"``).
    """
    if head is None:
        head = checkpoint.has_mlm_head
    config = merge_pretrained_config(checkpoint.config, overrides)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    with nnx.use_eager_sharding(False):
        model = (RoFormerMLM(config, tie_embeddings=checkpoint.tie_embeddings, rngs=rngs)
                 if head else RoFormerEncoder(config, rngs=rngs))
    left = load_pretrained_params(model, checkpoint, head=head)
    if left:
        raise ValueError(f"checkpoint: parameters {list(left)} were not in the checkpoint")
    return model
