"""Character-level NER on CLUENER 2020 with GlobalPointer (kexue.fm/archives/8373, 8877).

    python -m experiments.train --config configs/cluener_globalpointer.py --workdir runs/gp \\
        [--config.model.efficient=True] [--config.model.gp_loss=sparse]

Switches: `model.efficient` (Efficient GlobalPointer, archive 8877), `model.gp_loss`
("dense" ZLPR over all spans or "sparse" ZLPR over the gold spans, archive 7359).
The head kernels start at the reference `lecun_normal` (std 1/√fan_in);
`--config.model.gp_head_init_std=0.02` draws them like the encoder instead.
Reports span precision / recall / F1 over the whole dev set (`eval/f1`, from tp/fp/fn
summed over the set). Data: the official JSON lines in `data.manual_dir` (default
`kexue.data.default_cluener_dir()`, i.e. the repository's `.data/cluener` or
`../shared/data/cluener` when present; None downloads from the official URL).

Fine-tuning a pretrained Chinese BERT / RoFormer (the blog reports 80.0 dev F1 with
BERT-base, archive 8373):

    python -m experiments.train --config configs/cluener_globalpointer.py:finetune \
        --config.model.init_from=chinese_roformer-char_L-12_H-768_A-12 --workdir runs/gp_ft

The `finetune` preset mirrors bojone/GlobalPointer's CLUENER_GlobalPointer.py (the
code of kexue.fm/archives/8373): Adam at 2e-5 for every weight, batch 16, 10 epochs
(6720 steps), dev evaluation after each epoch with the best-F1 checkpoint kept
(`configs.common.cluener_finetune_preset`). The encoder's architecture and the
WordPiece `data.vocab_file` come from the checkpoint. The F1 is over token spans;
gold spans that are not whole word pieces cannot be predicted and count as misses
(`eval/dropped_spans`), as in the script's character-level scoring.
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
        "model.gp_head_dim": 16, "data.batch_size": 8, "data.max_examples": 32,
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

    config.model = cluener_encoder_config(
        "global_pointer_ner", gp_head_dim=64, efficient=False,
        gp_loss="dense")  # gp_loss: "dense" or "sparse"
    config.optimizer = optimizer_config("amos_style", learning_rate=0.01, half_life=1500)
    config.train = cluener_train_config("f1")
    config.mesh = mesh_config()
    config.objective = ml_collections.ConfigDict()
    config.eval = ml_collections.ConfigDict()
    return with_preset(config, PRESETS, preset)
