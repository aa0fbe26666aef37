"""Character-level NER on CLUENER 2020 with token-level BIO tagging: the GlobalPointer baseline.

    python -m experiments.train --config configs/cluener_bio.py --workdir runs/bio

The encoder, data, optimizer and schedule of `configs/cluener_globalpointer.py`, with
a linear softmax head over the `2·types + 1` BIO tags per token (`model.name =
"bio_tagger"`, `kexue.models.BIOTagger`) trained by cross-entropy over real tokens.
The tags are made from the gold spans (a B on the first character, I's on the rest;
overlapping gold spans cannot all be written, see `kexue.models.bio_tags_from_spans`)
and the predicted tags are read back as spans (a B-x starts an x span, the I-x that
follow extend it, an I-x without a B starts nothing). `eval/f1` counts the same span
tp/fp/fn as GlobalPointer, against every gold span; `eval/bio_unrepresentable` is
how many gold spans the tags could not hold (kexue.fm/archives/8373 compares
GlobalPointer against CRF tagging). `:finetune` with `--config.model.init_from=PATH`
tunes a pretrained encoder with the setup of configs/cluener_globalpointer.py's
`finetune` preset (bojone/GlobalPointer's CLUENER script).
"""

import ml_collections

from configs.common import (
    cluener_data_config,
    cluener_encoder_config,
    cluener_finetune_preset,
    cluener_train_config,
    mesh_config,
    optimizer_config,
    with_preset,
)

PRESETS = {
    "smoke": {
        "model.width": 32, "model.num_layers": 1, "model.num_heads": 2, "model.mlp_dim": 64,
        "data.batch_size": 8, "data.max_examples": 32,
        "data.eval_batches": 4,  # the first 32 dev sentences
        "train.num_steps": 4, "train.log_every": 2, "train.eval_every": 4,
        "train.checkpoint_every": 4,
    },
    "finetune": cluener_finetune_preset("f1"),
}


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = cluener_data_config(task="ner", max_spans=32)

    config.model = cluener_encoder_config("bio_tagger")
    config.optimizer = optimizer_config("amos_style", learning_rate=0.01, half_life=1500)
    config.train = cluener_train_config("f1")
    config.mesh = mesh_config()
    config.objective = ml_collections.ConfigDict()
    config.eval = ml_collections.ConfigDict()
    return with_preset(config, PRESETS, preset)
