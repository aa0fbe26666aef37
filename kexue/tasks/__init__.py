"""Training tasks: a loss, evaluation as per-batch sums, one finalize into metrics.

    from kexue import tasks
    task = tasks.NERTask(num_types=10)
    loss, aux = task.loss(model, batch, rng)                  # inside a jitted step
    totals = tasks.add_sums(totals, task.eval_stats(model, batch))
    metrics = task.finalize({tasks.EVAL: totals})             # once, over the whole set

* `LMTask` — causal language modelling, evaluation at several context lengths.
* `MLMTask` — masked language modelling (contiguous or equal-mean random positions).
* `NERTask` — span NER with GlobalPointer (optionally R-Drop) or a BIO tagger.
* `MultiLabelTask` — multi-label classification with ZLPR or sigmoid BCE.

Every task follows the `Task` protocol (`kexue.tasks.base`), which
`kexue.train.train_loop` consumes; the batches are those of `kexue.data.make_dataset`.
"""

from kexue.tasks.base import EVAL, Sums, Task, add_sums, eval_batches, ratio
from kexue.tasks.lm import LMTask, split_windows
from kexue.tasks.mlm import POSITIONS, MLMTask, random_equal_mean_positions
from kexue.tasks.multilabel import LOSSES, MultiLabelTask
from kexue.tasks.ner import NERTask, scored_spans, span_valid

__all__ = [
    "EVAL",
    "LOSSES",
    "POSITIONS",
    "LMTask",
    "MLMTask",
    "MultiLabelTask",
    "NERTask",
    "Sums",
    "Task",
    "add_sums",
    "eval_batches",
    "random_equal_mean_positions",
    "ratio",
    "scored_spans",
    "span_valid",
    "split_windows",
]
