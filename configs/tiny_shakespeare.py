"""Byte-level causal LM on TFDS's `tiny_shakespeare`: any TFDS catalog dataset by name.

    python -m experiments.train --config configs/tiny_shakespeare.py --workdir runs/shakespeare

The same code path and model as configs/lm_stdlib.py with `data.name =
"tiny_shakespeare"`: the builder comes from the TFDS catalog
(`kexue.data.make_builder`), is prepared once in `array_record` format under
`data.data_dir` and is read without TensorFlow. It needs a network connection the
first time (TFDS downloads the text), so it does not run offline and the test suite
only checks that the config resolves. Each split ("train", "validation", "test") is
one example holding the whole text in the feature `text`.
"""

import ml_collections

from configs import lm_stdlib

PRESETS = lm_stdlib.PRESETS


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    config = lm_stdlib.get_config(preset)
    config.data.name = "tiny_shakespeare"
    config.data.text_key = "text"
    config.data.pattern = None
    config.data.eval_batches = 8
    config.eval.sample_prompt = "ROMEO:"
    return config
