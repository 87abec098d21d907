"""The run's hyperparameters (`TrainConfig`, read from experiment files) and the policies for a
non-finite step. The optimizer's are `lm.train.optim.OptimizerConfig`."""

from __future__ import annotations

import dataclasses

from lm import lora
from lm.utils import config_from_dict

NONFINITE_POLICIES = ("abort", "skip", "rollback")
# Experiment trackers `train.loggers` may name (lm.train.metrics); metrics.jsonl is always written.
LOGGERS = ("tensorboard", "wandb")


def check_nonfinite_policy(value: str) -> None:
    if value not in NONFINITE_POLICIES:
        raise ValueError(
            f"train.nonfinite={value!r}: use one of {', '.join(map(repr, NONFINITE_POLICIES))}"
        )


def parse_loggers(value: str) -> tuple[str, ...]:
    """The tracker names in a comma-separated `train.loggers` value, in order, each once
    (() for ""). ValueError names an unknown one and the known ones."""
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise ValueError(
            f"train.loggers={value!r}: unknown logger {unknown[0]!r}; "
            f"known: {', '.join(map(repr, LOGGERS))} (comma-separated, '' for metrics.jsonl only)"
        )
    return names


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500  # 0 = only at the end
    eval_batches: int = 0  # evaluate on the first n batches of the split; 0 = all of it
    eval_at_start: bool = False  # also evaluate before the first step (fine-tuning baselines)
    # Harness tasks (lm.evaluation, comma-separated, e.g. "heldout_order,lambada") run with
    # every evaluation, on the first eval_tasks_limit documents of each (0 = all).
    eval_tasks: str = ""
    eval_tasks_limit: int = 200
    eval_tasks_fewshot: int = -1  # -1 = each task's default k
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    # A step with a non-finite loss, gradient or update: 'abort' (stop, naming the step, exit
    # non-zero), 'skip' (that step changes nothing) or 'rollback' (back to the last checkpoint,
    # the step's batch dropped for good). See train_loop.
    nonfinite: str = "abort"
    sample_prompt: str = ""
    sample_tokens: int = 100
    sample_temperature: float = 0.8
    peak_flops_per_device: float = 0.0  # 0 = guess from the device kind (for MFU)
    progress: bool = True
    # Fine-tuning. init_from: start from another run's parameters (a workdir; see
    # lm.main.init_source) when this workdir has no checkpoint of its own yet.
    init_from: str = ""
    # LoRA (lm.lora): rank 0 = off (train every parameter); else only adapters on the
    # kernels named in lora_targets (comma-separated module names) are trained.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = ",".join(lora.DEFAULT_TARGETS)
    # Resuming may change only what leaves the run's mathematics alone (lm.history); other
    # keys named here (comma-separated, e.g. "data.batch_size,optimizer.learning_rate") are
    # accepted and recorded in WORKDIR/history.json.
    allow_changes: str = ""
    # The workdir lease (lm.lease): a trainer whose heartbeat is older than this may be taken
    # over by another (one on this host whose process is gone, at once).
    lease_timeout_s: float = 300.0
    # Profiling (lm.train.profile): a jax.profiler trace of profile_steps steps from step
    # profile_start (1-based; 0 = none scheduled) into WORKDIR/profile; another window of
    # profile_steps whenever WORKDIR/PROFILE is touched or the process gets SIGUSR1.
    profile_start: int = 0
    profile_steps: int = 5
    # Write the train step's optimized HLO, memory and cost analyses to WORKDIR/compiled.
    dump_compiled: bool = False
    # The hang watchdog (lm.train.watchdog): no step completed for this long (after the first;
    # evaluation and checkpoints excepted) writes every thread's stack to the log and exits
    # with status 75 (WATCHDOG_EXIT) for the launcher to restart the run. 0 = off.
    step_timeout_s: float = 0.0
    # Experiment trackers that get every logged row besides metrics.jsonl (always written):
    # comma-separated names from LOGGERS, "" for none. wandb needs the [wandb] extra; its run
    # goes to wandb_project, under wandb_entity ("" = W&B's default entity).
    loggers: str = "tensorboard"
    wandb_project: str = "lm"
    wandb_entity: str = ""

    def __post_init__(self):
        for key, low in [
            ("steps", 1),
            ("log_every", 1),
            ("checkpoint_every", 1),
            ("keep_checkpoints", 1),
            ("eval_every", 0),
            ("eval_batches", 0),
            ("eval_tasks_limit", 0),
            ("eval_tasks_fewshot", -1),
            ("sample_tokens", 0),
            ("sample_temperature", 0),
        ]:
            if getattr(self, key) < low:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= {low}")
        if self.step_timeout_s < 0:
            raise ValueError(
                f"train.step_timeout_s={self.step_timeout_s} must be >= 0 (seconds; 0 = no watchdog)"
            )
        if self.profile_start < 0 or self.profile_steps < 1:
            raise ValueError(
                f"train.profile_start={self.profile_start}, train.profile_steps="
                f"{self.profile_steps}: the first profiled step must be >= 0 (0 = none) and the "
                "window at least 1 step"
            )
        if self.lease_timeout_s <= 0:
            raise ValueError(f"train.lease_timeout_s={self.lease_timeout_s} must be > 0 (seconds)")
        self.lora  # noqa: B018 - validates the LoRA values now, with their config names
        check_nonfinite_policy(self.nonfinite)
        self.logger_names  # noqa: B018 - validates train.loggers now

    @property
    def logger_names(self) -> tuple[str, ...]:
        """The trackers named in `loggers` (see `parse_loggers`)."""
        return parse_loggers(self.loggers)

    @property
    def lora(self) -> lora.LoraConfig:
        return lora.LoraConfig.from_strings(self.lora_rank, self.lora_alpha, self.lora_targets)

    @classmethod
    def from_dict(cls, values):
        return config_from_dict(cls, dict(values), prefix="train")
