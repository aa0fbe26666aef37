"""Every config resolves and passes `check_config`; presets and overrides compose in order."""

from __future__ import annotations

from pathlib import Path

import pytest
from ml_collections import config_flags  # noqa: F401  (registers the config file loader)

from experiments import _build

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py")
                 if p.name != "demo.py")


def load(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_under_test", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("preset", ["full", "smoke"])
def test_every_config_and_preset_is_valid(path, preset):
    module = load(path)
    config = _build.resolve_config(module.get_config(preset), module.PRESETS, {})
    _build.check_config(config)
    assert config.preset == preset


def test_preset_overrides_file_and_command_line_overrides_preset():
    module = load("configs/lm_stdlib.py")
    config = module.get_config()
    config.preset = "smoke"
    config.train.num_steps = 3  # as if given by --config.train.num_steps=3
    resolved = _build.resolve_config(config, module.PRESETS, {"train.num_steps": 3})
    assert resolved.model.width == module.PRESETS["smoke"]["model.width"]
    assert resolved.train.num_steps == 3
    assert module.get_config().model.width != resolved.model.width


@pytest.mark.parametrize("key, value, message", [
    ("preset", "tiny", "`preset`: expected one of ['full', 'smoke']"),
])
def test_unknown_preset(key, value, message):
    module = load("configs/lm_stdlib.py")
    config = module.get_config()
    config[key] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _build.resolve_config(config, module.PRESETS, {})


@pytest.mark.parametrize("path, value, message", [
    ("train.chekpoint_every", 5, "`train.chekpoint_every`; did you mean `checkpoint_every`"),
    ("data.seqlen", 5, "`data.seqlen`; did you mean `seq_len`"),
    ("objective.positions", "shuffled", "`objective.positions`: expected one of"),
    ("train.checkpoint_every", 150, "multiple of `train.eval_every`"),
    ("optimizer.amos_style.learning_rate", -1.0, "expected a positive number"),
])
def test_check_config_names_the_key(path, value, message):
    module = load("configs/mlm_extrapolation.py")
    config = module.get_config()
    section, key = path.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    with node.ignore_type():
        node[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _build.check_config(config)
