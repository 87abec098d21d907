"""The training loop: restore or init, then batches, steps, evaluation, checkpoints and SIGTERM;
and `IndexedBatches`, a batch source for data that is a function of its position.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from lm import storage
from lm.checkpoint import Checkpointer
from lm.train.config import TrainConfig
from lm.train.metrics import MetricWriter
from lm.train.monitor import Monitor, process_step_times
from lm.train.nonfinite import NonFiniteGuard
from lm.train.profile import ProfileWindows, dump_compiled
from lm.train.step import TrainState
from lm.train.throughput import flops_per_token, peak_flops_per_device
from lm.train.trainer import Trainer


class _Preemption:
    """Whether the loop should save a checkpoint and stop: a preemption notice (SIGTERM) or
    Ctrl-C (SIGINT, handled alike; a second Ctrl-C ends the process at once, saving nothing
    more: checkpoints already written are whole, a save in flight is left unfinished and is
    cleaned up by the next run).

    One process: either signal sets a flag. Several processes (`jax.distributed`): a
    checkpoint save is collective, so a SIGTERM to any one of them must stop all of them at the
    same step. JAX's preemption service (started by `jax.distributed.initialize`) catches
    SIGTERM in every process and agrees on a step through the coordinator in the background;
    `multihost_utils.reached_preemption_sync_point(step)` turns True in every process at that
    step. It is a host-side check of local state (no communication unless a notice came),
    called once per step by every process, as the service requires. Installing a Python
    SIGTERM handler there would replace the service's, so none is installed; Ctrl-C is turned
    into a SIGTERM to this process for the service to handle.

    lease: the workdir's (`lm.lease.Lease`), checked at every step: a lease another trainer
    took over stops the run without saving.
    """

    def __init__(self, lease=None):
        self.coordinated = jax.process_count() > 1
        self._signalled = False
        self._previous = {}
        self._lease = lease

    def __enter__(self):
        if self.coordinated and not jax.config.jax_enable_preemption_service:
            raise ValueError(
                "a multi-process run needs JAX's preemption service to stop every process at "
                "the same step on SIGTERM: do not set jax_enable_preemption_service=False"
            )
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGINT,) if self.coordinated else (signal.SIGINT, signal.SIGTERM)
            self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def _handle(self, signum, frame):
        self._signalled = True
        # A second Ctrl-C ends the process at once, by the default action, even while it is
        # inside a compiled call (a Python handler would run only after it returns).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(
            f"{name}: saving a checkpoint after this step, then stopping "
            "(Ctrl-C again to exit at once, saving nothing more)",
            file=sys.stderr,
            flush=True,
        )
        if self.coordinated:  # the preemption service agrees on the step with the others
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """True: save `step` and stop (the same step in every process)."""
        if self._lease is not None:
            self._lease.check()
        if not self.coordinated:
            return self._signalled
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            logging.warning(
                "preemption notice (SIGTERM to a process of this run): every process saves step "
                "%d and stops",
                step,
            )
            return True
        return False

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class IndexedBatches:
    """A batch source for data that is a pure function of its position in the stream:
    `batch_at(0)`, `batch_at(1)`, ... Its state (saved with every checkpoint, like a Grain
    iterator's) is the next position, so a resumed run draws exactly the batches an unbroken
    run would. For synthetic data (lm.icl's regression prompts, induction sequences).

    batch_at: position -> this process's batch (numpy arrays with a leading batch axis).
    """

    def __init__(self, batch_at: Callable[[int], dict[str, np.ndarray]]):
        self._batch_at = batch_at
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._batch_at(self._next)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next": self._next}

    def set_state(self, state: dict[str, int]) -> None:
        self._next = int(state["next"])


class _Log:
    """The loop's log lines: the last step's metrics, throughput and the share of time spent
    waiting for batches over the window since the last line, MFU, the data's own metrics
    (`data_metrics`, a mixture's), written to `MetricWriter` and the progress bar."""

    def __init__(
        self, workdir, trainer: Trainer, train_config: TrainConfig, seq_len, start, record
    ):
        self.writer = MetricWriter(
            workdir,
            start,
            loggers=train_config.logger_names,
            record=record,
            wandb_project=train_config.wandb_project,
            wandb_entity=train_config.wandb_entity,
        )
        self._host_metrics = trainer.host_metrics
        self._flops = flops_per_token(trainer.model_config, trainer.num_params, seq_len or 1)
        peak = peak_flops_per_device(train_config.peak_flops_per_device)
        self._peak = peak * jax.device_count()
        self.progress = None
        if train_config.progress and jax.process_index() == 0:
            from tqdm import tqdm

            self.progress = tqdm(
                total=train_config.steps,
                initial=start,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )
        self.restart()

    def restart(self, step: int | None = None) -> None:
        """A new window (after a line, or from `step` after a rollback)."""
        self.tokens, self.steps, self.wait, self.start = 0.0, 0, 0.0, time.perf_counter()
        if step is not None and self.progress is not None:
            self.progress.n = step
            self.progress.refresh()

    def line(self, pending, data_iterator) -> tuple[tuple[int, ...], list[dict], dict]:
        """(steps, their host metrics, the line's values) of the window's pending steps."""
        steps, host = zip(*jax.device_get(pending), strict=True)
        host = [self._host_metrics(m) for m in host]
        self.tokens += sum(t for t in (float(m["tokens"]) for m in host) if math.isfinite(t))
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        skip = ("loss", "tokens", "finite", "nonfinite_skipped")
        logged = {"loss": float(host[-1]["loss"])}  # then the step's other metrics
        logged |= {k: float(v) for k, v in host[-1].items() if k not in skip}
        logged |= {
            "tokens_per_sec": self.tokens / elapsed,
            "steps_per_sec": self.steps / elapsed,
            "data_wait_fraction": self.wait / elapsed,  # a starving run shows here
        }
        if jax.process_count() > 1:  # a straggler shows in its own wait for data
            per_step = max(self.steps, 1)
            logged |= process_step_times(steps[-1], elapsed / per_step, self.wait / per_step)
        if hasattr(data_iterator, "data_metrics"):  # the LM pipeline's: a mixture's
            logged |= data_iterator.data_metrics()
        if self._peak > 0:
            logged["mfu"] = logged["tokens_per_sec"] * self._flops / self._peak
        return steps, list(host), logged

    def show(self, step: int, logged: dict) -> None:
        """The line on the progress bar (or the log), and a new window."""
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{logged['loss']:.3f}",
                tok_s=f"{logged['tokens_per_sec']:,.0f}",
                mfu=f"{logged.get('mfu', 0):.1%}",
                refresh=False,
            )
        else:
            logging.info("step %d %s", step, logged)
        self.restart()

    def close(self) -> None:
        self.writer.close()
        if self.progress is not None:
            self.progress.close()


def _evaluate(trainer: Trainer, evaluators, state) -> dict[str, float]:
    """Every evaluator's metrics of `state`, as ``<name>/<metric>``."""
    host = trainer.host_state(state)
    return {f"{name}/{k}": float(v) for name, fn in evaluators.items() for k, v in fn(host).items()}


def _restore_or_init(checkpointer, trainer: Trainer, train_config: TrainConfig, data_iterator):
    """(the state to train from, its step): the latest checkpoint's, else a fresh init."""
    if checkpointer.latest_step() is None:
        return trainer.init_fn(train_config.seed), 0
    try:
        start, state = checkpointer.restore(trainer.abstract_state, data_iterator)
    except Exception:
        checkpointer.close()
        raise
    logging.info("resumed from step %d", start)
    return state, start


def _save(checkpointer, guard: NonFiniteGuard, trainer, state, step, data_iterator, force=False):
    if step not in checkpointer.all_steps():
        if checkpointer.save(step, trainer.host_state(state), data_iterator, force=force):
            guard.saved()


def _evaluate_at_start(log: _Log, evaluate, state) -> None:
    initial = evaluate(state)
    log.writer.write(0, initial)
    logging.info("before training: %s", initial)
    if jax.process_index() == 0:
        print("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in initial.items()), flush=True)


def _timed(monitor: Monitor, bucket: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its time counted to `bucket`; then back to "steps"."""
    monitor.enter(bucket)
    try:
        return fn(*args, **kwargs)
    finally:
        monitor.enter("steps")


def _first_step_extras(train_config: TrainConfig, trainer: Trainer, state, batch, workdir):
    """What runs before a start's first step: the compiled program's dump if asked for."""
    if train_config.dump_compiled and jax.process_index() == 0:
        dump_compiled(trainer.train_step, state, batch, workdir)


def _train(
    trainer, train_config, workdir, data_iterator, monitor, *, evaluators, seq_len, lease, record
):
    """The loop of `train_loop`: -> (the final host state, its step, whether it was stopped)."""
    trainer = trainer.with_nonfinite(train_config.nonfinite)
    guard = NonFiniteGuard(train_config.nonfinite, workdir)
    keep, async_save = train_config.keep_checkpoints, train_config.async_checkpoints
    checkpointer = Checkpointer(workdir, keep=keep, async_save=async_save)
    if checkpointer.latest_step() is not None:
        monitor.enter("restore")
    state, start = _restore_or_init(checkpointer, trainer, train_config, data_iterator)
    monitor.enter("startup")
    monitor.ledger.begin(start)
    guard.start(start, data_iterator)
    logging.info("%s", trainer.parameter_summary())
    state = trainer.to_device_state(state)
    log = _Log(workdir, trainer, train_config, seq_len, start, record)
    evaluate = functools.partial(
        _timed, monitor, "evaluation", _evaluate, trainer, evaluators or {}
    )
    save = functools.partial(
        _timed, monitor, "checkpoint_save", _save, checkpointer, guard, trainer
    )
    if start == 0 and train_config.eval_at_start and evaluators:
        _evaluate_at_start(log, evaluate, state)
    total, step, pending, stop, in_flight = train_config.steps, start, [], False, None
    rollback = functools.partial(
        _timed,
        monitor,
        "restore",
        guard.handle,
        checkpointer=checkpointer,
        trainer=trainer,
        data_iterator=data_iterator,
        seed=train_config.seed,
    )
    profile = ProfileWindows(workdir, train_config.profile_start, train_config.profile_steps)
    try:
        with _Preemption(lease) as preemption, profile:
            while step < total and not (stop := preemption.reached(step)):
                profile.before_step(step + 1)
                monitor.enter("data_wait", step + 1)
                waited = time.perf_counter()
                batch, position = guard.next_batch(data_iterator)
                log.wait += time.perf_counter() - waited
                batch = trainer.put_batch(batch)
                monitor.enter("compile" if step == start else "steps", step + 1)
                if step == start:
                    _first_step_extras(train_config, trainer, state, batch, workdir)
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    state, metrics = trainer.train_step(state, batch)
                monitor.enter("steps", step + 1)
                if in_flight is not None:
                    monitor.completed(*in_flight)
                step, log.steps, in_flight = step + 1, log.steps + 1, (step + 1, metrics)
                pending.append((step, metrics))
                guard.record(step, position, metrics)
                profile.after_step(step, metrics)
                is_eval = train_config.eval_every and step % train_config.eval_every == 0
                is_log = step % train_config.log_every == 0 or is_eval or step == total
                is_save = step % train_config.checkpoint_every == 0 or step == total
                if (is_log or is_save) and (bad := guard.first_bad()) is not None:
                    state, step = rollback(bad)  # abort raises
                    pending, in_flight = [], None
                    log.restart(step)
                    continue
                if is_log:
                    steps, host, logged = log.line(pending, data_iterator)
                    pending = []
                    logged |= guard.log_fields(steps, host)
                    logged |= evaluate(state) if is_eval or step == total else {}
                    log.writer.write(step, logged)
                    guard.check_skip_limit(step, checkpointer)
                    log.show(step, logged)
                    profile.look_for_trigger()
                if log.progress is not None:
                    log.progress.update(1)
                if is_save:
                    save(state, step, data_iterator)
            if in_flight is not None:
                monitor.completed(*in_flight)
            if stop and step < total:
                if (bad := guard.first_bad()) is not None:  # rollback: back at a saved step
                    state, step = rollback(bad)
                save(state, step, data_iterator, force=True)
        monitor.enter("checkpoint_save")
        checkpointer.wait()
        if stop and step < total and jax.process_index() == 0:
            print(f"stopped at step {step}, saved: rerun the command to resume", flush=True)
    finally:  # also on errors: saves in flight (all of finite states) land
        monitor.enter("checkpoint_save")
        checkpointer.close()
        monitor.enter("other")
        log.close()
    return trainer.host_state(state), step, stop and step < total


def train_loop(
    trainer: Trainer,
    train_config: TrainConfig,
    workdir: storage.PathLike,
    data_iterator,
    *,
    evaluators: dict[str, Callable[[TrainState], dict[str, float]]] | None = None,
    seq_len: int = 0,
    on_end: Callable[[TrainState], None] | None = None,
    lease=None,
    record: dict | None = None,
    started_at: float | None = None,
) -> TrainState:
    """Trains to `train_config.steps`, resuming from the workdir's latest checkpoint.

    data_iterator: a checkpointable Grain iterator of process-local numpy batches.
    evaluators: name -> callable(state) -> metrics, run every `eval_every` steps and at the end;
      their metrics are logged as `<name>/<metric>`.
    on_end: called with the final state (e.g. to print samples).
    lease: the workdir's `lm.lease.Lease`, checked at every step (None: not checked).
    record: what the trackers record about the run (its resolved config).
    started_at: when the run's process started, for the goodput ledger (None: now).

    Non-finite steps (`train.nonfinite`: abort, skip, rollback): see `NonFiniteGuard`. Where
    the time goes: `lm.train.goodput`; hangs: `lm.train.watchdog`; traces: `lm.train.profile`.
    """
    workdir = storage.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    monitor = Monitor(workdir, train_config.step_timeout_s, started_at)
    outcome = "failed"
    try:
        with monitor:
            state, step, stopped = _train(
                trainer,
                train_config,
                workdir,
                data_iterator,
                monitor,
                evaluators=evaluators,
                seq_len=seq_len,
                lease=lease,
                record=record,
            )
            monitor.enter("evaluation")
            if on_end is not None and step == train_config.steps:
                on_end(state)
            monitor.enter("other")
        outcome = "stopped" if stopped else "finished"
    finally:
        monitor.close(outcome)
    return state
