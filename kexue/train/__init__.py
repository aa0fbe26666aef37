"""Pure train/eval steps, the training loop, Orbax checkpointing and metric writers.

    state = create_train_state(model_factory, tx, mesh)          # sharded at creation
    train_step = make_train_step(loss_fn, tx, abstract_train_state(...), mesh)
    result = train_loop(model_factory=..., loss_fn=..., tx=..., train_data=...,
                        mesh=mesh, config=LoopConfig(num_steps=...), workdir=...)

Model- and data-agnostic: a model is any `nnx.Module` built by a no-argument
factory, a loss is `(model, batch, rng) -> (loss, aux metrics)`, data is an iterator
with `get_state` / `set_state`.

A run directory has one writer (`WorkdirLock`, held by `train_loop`) and any number of
readers (`Checkpointer(..., read_only=True)`), which never change it.
"""

from kexue.train.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointSaveError,
    Restored,
    checksum_mismatches,
    state_checksums,
)
from kexue.train.loop import (
    FINAL_METRICS,
    OPERATOR_ERRORS,
    CheckpointableIterator,
    LoopConfig,
    NonFiniteError,
    TrainResult,
    check_resume,
    count_tokens,
    evaluate,
    finalize_mean,
    read_final_metrics,
    train_loop,
)
from kexue.train.measure import interleaved_median_times, machine_description, today
from kexue.train.metrics import (
    JsonlWriter,
    MetricWriter,
    ProgressBar,
    TensorBoardWriter,
    format_duration,
    format_number,
    scalars,
)
from kexue.train.preemption import PreemptionGuard
from kexue.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    train_state_shardings,
)
from kexue.train.steps import (
    LossFn,
    StatsFn,
    cpu_compiler_options,
    loss_stats,
    make_eval_step,
    make_train_step,
)
from kexue.train.workdir import (
    ERROR_LOG,
    LOCK_FILE,
    WorkdirError,
    WorkdirLock,
    WorkdirLockedError,
    check_workdir,
    read_json,
    report_failure,
    write_json_atomic,
)

__all__ = [
    "ERROR_LOG",
    "FINAL_METRICS",
    "LOCK_FILE",
    "OPERATOR_ERRORS",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "CheckpointableIterator",
    "Checkpointer",
    "JsonlWriter",
    "LoopConfig",
    "LossFn",
    "MetricWriter",
    "NonFiniteError",
    "PreemptionGuard",
    "ProgressBar",
    "Restored",
    "StatsFn",
    "TensorBoardWriter",
    "TrainResult",
    "TrainState",
    "WorkdirError",
    "WorkdirLock",
    "WorkdirLockedError",
    "abstract_train_state",
    "check_resume",
    "check_workdir",
    "checksum_mismatches",
    "count_tokens",
    "cpu_compiler_options",
    "create_train_state",
    "evaluate",
    "finalize_mean",
    "format_duration",
    "format_number",
    "interleaved_median_times",
    "loss_stats",
    "machine_description",
    "make_eval_step",
    "make_train_step",
    "read_final_metrics",
    "read_json",
    "report_failure",
    "scalars",
    "state_checksums",
    "today",
    "train_loop",
    "train_state_shardings",
    "write_json_atomic",
]
