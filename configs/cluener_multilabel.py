"""Which CLUENER entity types occur in a sentence: multi-label classification.

    python -m experiments.train --config configs/cluener_multilabel.py --workdir runs/ml \\
        [--config.objective.loss=sigmoid_bce]

`objective.loss`: "zlpr" (softmax + cross-entropy generalised to multi-label,
kexue.fm/archives/7359, decides at score 0 with no threshold to tune) or
"sigmoid_bce" (one binary cross-entropy per class, decides at probability 0.5, i.e.
also at score 0). Reports micro and macro F1 over the whole dev set. Data as in
configs/cluener_globalpointer.py.

`:finetune` starts the encoder from a pretrained BERT / RoFormer checkpoint
(`--config.model.init_from=PATH`) with the GlobalPointer fine-tuning setup of
bojone/GlobalPointer (Adam at 2e-5, batch 16, 10 epochs, the best micro F1 of the
per-epoch evaluations kept; `configs.common.cluener_finetune_preset`), applied to
this classifier.
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
    "finetune": cluener_finetune_preset("micro_f1"),
}


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = cluener_data_config(task="multilabel")

    config.model = cluener_encoder_config("multilabel_classifier", pooling="mean")
    config.optimizer = optimizer_config("amos_style", learning_rate=0.01, half_life=1500)
    config.train = cluener_train_config("micro_f1")
    config.mesh = mesh_config()
    config.objective = ml_collections.ConfigDict()
    config.objective.loss = "zlpr"  # or "sigmoid_bce"
    config.eval = ml_collections.ConfigDict()
    return with_preset(config, PRESETS, preset)
