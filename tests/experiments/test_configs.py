"""Every config loads and passes `experiments.config.check`; presets and overrides compose
in order; bad keys and values are reported naming the config key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from experiments import config as experiment_config
from experiments import run as experiment_run
from kexue.train import WorkdirError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py")
                 if p.name not in ("demo.py", "common.py"))


def load(path: str, preset: str = "full", **overrides):
    return experiment_config.load(str(ROOT / path), preset=preset, overrides=overrides)


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("preset", ["full", "smoke"])
def test_every_config_and_preset_is_valid(path, preset):
    config = load(path, preset)
    experiment_config.check(config)
    assert config.preset == preset


def test_preset_applies_over_the_file_and_overrides_over_the_preset():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_stdlib", ROOT / "configs/lm_stdlib.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    smoke = load("configs/lm_stdlib.py", "smoke", **{"train.num_steps": 3})
    assert smoke.model.width == module.PRESETS["smoke"]["model.width"]
    assert smoke.train.num_steps == 3
    assert load("configs/lm_stdlib.py").model.width != smoke.model.width


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=re.escape("`preset`: expected one of ['full', 'smoke']")):
        load("configs/lm_stdlib.py", "tiny")


@pytest.mark.parametrize("path, value, message", [
    ("train.chekpoint_every", 5, "`train.chekpoint_every`; did you mean `checkpoint_every`"),
    ("data.seqlen", 5, "`data.seqlen`; did you mean `seq_len`"),
    ("data.seq_len", 0, "config key `data.seq_len`: expected a positive int; got 0"),
    ("model.num_heads", 3, "config key `model.num_heads`: expected a divisor of `width`"),
    ("mesh.model", 2, "unknown config key `mesh.model`"),
    ("train.log_every", 0, "config key `train.log_every`: expected an int >= 1; got 0"),
    ("objective.positions", "shuffled", "`objective.positions`: expected one of"),
    ("train.checkpoint_every", 150, "multiple of `train.eval_every`"),
    ("optimizer.amos_style.learning_rate", -1.0, "expected a finite number > 0"),
    ("optimizer.clip_norm", float("nan"), "`optimizer.clip_norm`: expected a finite number"),
    ("optimizer.amos_style.q", float("inf"), "`optimizer.amos_style.q`: expected a finite"),
    ("optimizer.adamw.beta", 0.9, "unknown config key `optimizer.adamw.beta`"),
])
def test_check_names_the_key(path, value, message):
    config = load("configs/mlm_extrapolation.py")
    section, key = path.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    with node.ignore_type():
        node[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        experiment_config.check(config)


def test_mesh_that_does_not_fit_names_the_sizes():
    config = load("configs/lm_stdlib.py", "smoke", **{"mesh.data": 2, "mesh.fsdp": 2,
                                                        "mesh.tensor": 4})
    with pytest.raises(ValueError, match=re.escape(
            "config `mesh` (mesh.data=2, mesh.fsdp=2, mesh.tensor=4) does not fit the 8 devices")):
        experiment_run.mesh_from(config)
    config = load("configs/lm_stdlib.py", "smoke", **{"mesh.data": 2, "mesh.fsdp": -1,
                                                        "mesh.tensor": 2})
    assert dict(experiment_run.mesh_from(config).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_saved_config_reads_back_with_tuples(tmp_path):
    config = load("configs/mlm_extrapolation.py", "smoke")
    assert experiment_config.save(config, str(tmp_path)) == {}
    again = experiment_config.load_saved(str(tmp_path))
    assert again.eval.lengths == config.eval.lengths == (64, 128)
    assert again.to_dict() == config.to_dict()
    config.train.num_steps = 9
    assert experiment_config.save(config, str(tmp_path)) == {"train.num_steps": "4 -> 9"}


def test_damaged_saved_config_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WorkdirError, match=re.escape("config.json:1 is damaged")):
        experiment_config.load_saved(str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        experiment_config.load_saved(str(tmp_path / "missing"))


@pytest.mark.parametrize("alpha", [-1.0, "4", True, float("nan"), float("inf")])
def test_bad_rdrop_alpha_is_rejected_naming_the_key(alpha):
    config = load("configs/cluener_globalpointer.py", "smoke")
    with config.objective.ignore_type():
        config.objective.rdrop_alpha = alpha
    with pytest.raises(ValueError, match=r"`objective\.rdrop_alpha`: expected a finite number"):
        experiment_config.check(config)


def test_rdrop_needs_a_global_pointer_model():
    config = load("configs/cluener_bio.py", "smoke")
    config.objective.rdrop_alpha = 4.0
    with pytest.raises(ValueError, match=r"`objective\.rdrop_alpha`.*global_pointer_ner"):
        experiment_config.check(config)
    config.objective.rdrop_alpha = 0.0  # off: allowed for any model
    experiment_config.check(config)


def test_rdrop_alpha_is_not_a_key_of_other_tasks():
    config = load("configs/cluener_multilabel.py", "smoke")
    config.objective.rdrop_alpha = 1.0
    with pytest.raises(ValueError, match=r"unknown config key `objective\.rdrop_alpha`"):
        experiment_config.check(config)


def test_settings_of_an_optimizer_that_is_not_used_are_an_error():
    config = load("configs/lm_stdlib.py")  # optimizer.name = "amos"
    with pytest.raises(ValueError, match=re.escape(
            "config key `optimizer.adamw.learning_rate`: optimizer.name is 'amos', which reads "
            "`optimizer.amos` only, so optimizer.adamw.learning_rate would be ignored")):
        experiment_config.check_overrides(config, {"optimizer.adamw.learning_rate": 5.0,
                                                   "train.num_steps": 3})
    experiment_config.check_overrides(config, {"optimizer.amos.learning_rate": 0.2})
    switched = load("configs/lm_stdlib.py", **{"optimizer.name": "amos_factored"})
    experiment_config.check_overrides(switched, {"optimizer.name": "amos_factored",
                                                 "optimizer.amos.beta": 0.99})
