"""Byte-level causal LM on TFDS's `tiny_shakespeare`: any TFDS catalog dataset by name.

    python -m experiments.train --config configs/tiny_shakespeare.py --workdir runs/shakespeare

The model and schedule of configs/lm_stdlib.py with `data.name =
"tiny_shakespeare"`: the builder comes from the TFDS catalog
(`kexue.data.make_builder`), is prepared once in `array_record` format under
`data.data_dir` and is read without TensorFlow. It needs a network connection the
first time (TFDS downloads the text), so it does not run offline and the test suite
only checks that the config resolves. Each split ("train", "validation", "test") is
one example holding the whole text in the feature `text`.
"""

import ml_collections

from configs.common import (
    BYTE_LM_SMOKE,
    byte_lm_model_config,
    data_config,
    mesh_config,
    optimizer_config,
    train_config,
    with_preset,
)

PRESETS = {"smoke": BYTE_LM_SMOKE}


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = data_config(name="tiny_shakespeare", task="lm", tokenizer="byte",
                              text_key="text", seq_len=128, batch_size=16, eval_batches=8)

    config.model = byte_lm_model_config()

    config.optimizer = optimizer_config("amos", learning_rate=0.1)
    config.train = train_config(400, log_every=20, eval_every=100, checkpoint_every=100,
                                keep_checkpoints=2, best_metric="loss", best_mode="min")
    config.mesh = mesh_config()
    config.objective = ml_collections.ConfigDict()
    config.eval = ml_collections.ConfigDict({"sample_prompt": "ROMEO:", "sample_tokens": 160})
    return with_preset(config, PRESETS, preset)
