"""TrainState, loss, train/eval steps (jit over a mesh, or pmap) and the training loop.

The loop knows nothing about where batches or evaluations come from: `lm.main` hands it
a data iterator and evaluators (`state -> metrics` callables).
"""

from lm.train.config import NONFINITE_POLICIES, TrainConfig, check_nonfinite_policy
from lm.train.loop import IndexedBatches, train_loop
from lm.train.metrics import MetricWriter, read_metrics
from lm.train.nonfinite import (
    ROLLBACK_LIMIT,
    SKIP_LIMIT,
    SKIPPED_BATCHES,
    NonFiniteError,
    read_skipped_batches,
)
from lm.train.objective import (
    AUX_LOSSES,
    LANGUAGE_MODELLING,
    MODEL_INPUT_KEYS,
    Objective,
    chunked_loss_sums,
    cross_entropy,
    forward,
    forward_with_aux,
    language_model_sums,
    loss_sums,
    sum_aux_losses,
)
from lm.train.optim import OPTIMIZERS, OptimizerConfig, learning_rate_schedule, make_optimizer
from lm.train.step import (
    LoraTrainState,
    TrainState,
    _accumulated_grads,
    make_eval_step,
    make_train_step,
    mean_eval_metrics,
)
from lm.train.throughput import (
    PEAK_FLOPS,
    flops_per_token,
    matmul_peak,
    peak_flops_for_kind,
    peak_flops_per_device,
)
from lm.train.trainer import Trainer, check_params_fit, create_trainer

__all__ = [
    "NONFINITE_POLICIES",
    "OPTIMIZERS",
    "OptimizerConfig",
    "TrainConfig",
    "check_nonfinite_policy",
    "IndexedBatches",
    "train_loop",
    "MetricWriter",
    "read_metrics",
    "ROLLBACK_LIMIT",
    "SKIP_LIMIT",
    "SKIPPED_BATCHES",
    "NonFiniteError",
    "read_skipped_batches",
    "AUX_LOSSES",
    "LANGUAGE_MODELLING",
    "MODEL_INPUT_KEYS",
    "Objective",
    "chunked_loss_sums",
    "cross_entropy",
    "forward",
    "forward_with_aux",
    "language_model_sums",
    "loss_sums",
    "sum_aux_losses",
    "learning_rate_schedule",
    "make_optimizer",
    "LoraTrainState",
    "TrainState",
    "_accumulated_grads",
    "make_eval_step",
    "make_train_step",
    "mean_eval_metrics",
    "PEAK_FLOPS",
    "flops_per_token",
    "matmul_peak",
    "peak_flops_for_kind",
    "peak_flops_per_device",
    "Trainer",
    "check_params_fit",
    "create_trainer",
]
