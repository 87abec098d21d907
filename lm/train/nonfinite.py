"""Non-finite steps: `NonFiniteGuard` (the loop's abort / skip / rollback policy), the error,
and the file of batches that rollbacks dropped."""

from __future__ import annotations

import copy
import json
import logging
import math

import jax
import numpy as np

from lm import storage


class NonFiniteError(ValueError):
    """A training step was not finite (its loss, gradient norm, or the state it produced) and
    `train.nonfinite` says to stop, or rollbacks did not get past it. A ValueError, so that
    `lm.main` reports it in one line and exits non-zero."""


SKIPPED_BATCHES = "skipped_batches.json"


ROLLBACK_LIMIT = 3  # rollbacks with no checkpoint saved in between: the run diverges; stop


SKIP_LIMIT = 10  # steps skipped in a row: the state, not a batch, is broken; stop


def read_skipped_batches(workdir: storage.PathLike) -> list[dict]:
    """The batches that rollbacks dropped (WORKDIR/skipped_batches.json), in the order dropped:
    `{"position": p, "step": s, "restored_step": r}`: the batch at position p of the run's
    data stream (0 = the first batch the run drew) made step s non-finite, and the run went
    back to step r."""
    path = storage.as_path(workdir) / SKIPPED_BATCHES
    if not path.exists():
        return []
    try:
        batches = json.loads(path.read_text())["batches"]
        for entry in batches:
            entry["position"] = int(entry["position"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is unreadable ({e!r}): it lists the data batches this run drops; "
            "restore it, or delete it to train on every batch"
        ) from e
    return batches


def _write_skipped_batches(workdir, batches: list[dict]) -> None:
    """Atomically and durably (before any checkpoint that depends on it), on process 0."""
    if jax.process_index() == 0:
        storage.write_atomic(
            storage.as_path(workdir) / SKIPPED_BATCHES,
            json.dumps({"batches": batches}, indent=1) + "\n",
        )


def _data_position(step: int, dropped) -> int:
    """Batches drawn from the data stream to train `step` steps, `dropped` positions discarded."""
    position = step
    for p in sorted(dropped):
        if p >= position:
            break
        position += 1
    return position


_LOWER_LR = "Lower optimizer.learning_rate or clip gradients (optimizer.clip_norm)"


def _describe_nonfinite(step: int, metrics) -> str:
    loss, norm = (float(np.asarray(metrics[k]).reshape(-1)[0]) for k in ("loss", "grad_norm"))
    if math.isfinite(loss) and math.isfinite(norm):
        return (
            f"step {step} made the parameters or optimizer state non-finite (loss {loss:.4g}, "
            f"gradient norm {norm:.4g})"
        )
    return f"step {step} was not finite (loss {loss:.4g}, gradient norm {norm:.4g})"


class NonFiniteGuard:
    """The loop's policy for non-finite steps (`train.nonfinite`): it hands out batches by
    their position in the data stream (drawing and discarding the positions that rollbacks
    dropped), remembers the steps whose `finite` flag is unread, and on a bad one aborts or
    rolls back.

    Every step reports whether it was finite: its loss, its gradient norm, and the parameters
    and optimizer state it produced (`make_train_step`).
    The loop reads those flags only where it syncs with the device anyway: when it logs (with
    the metrics it reads there) and before every checkpoint save (the scheduled ones, the last
    one, a preemption's). So detection costs no sync per step, a bad step is found within
    `log_every` (or `checkpoint_every`) steps, and no state after a non-finite step is saved.
    - abort: stop with NonFiniteError naming the first bad step. Saves in flight finish (their
      states are from before it); nothing later is saved, so the last checkpoint is good.
    - skip: the step itself keeps the previous parameters and optimizer state; metrics.jsonl
      counts the skipped steps (`nonfinite_skipped`, since the start of training). SKIP_LIMIT
      skipped steps in a row mean the state itself is broken (e.g. finite but diverged): the
      run stops as abort does (found at a log).
    - rollback: restore the last checkpoint (the initial state if none was saved yet) with its
      data-iterator state and train on from there without the first bad step's batch. Batches
      are named by their position in the run's data stream (0 = the first batch it drew). The
      dropped positions go to WORKDIR/skipped_batches.json before training goes on, and every
      run of the workdir, whatever its policy, draws and discards them when it reaches them: a
      checkpoint of step S sits at position S plus the dropped positions before it, so a
      resumed run trains on exactly the batches of an unbroken one. The steps after the
      restored checkpoint are retrained (and logged again). `nonfinite_skipped` in
      metrics.jsonl counts the dropped batches. After ROLLBACK_LIMIT rollbacks with no
      checkpoint saved in between the run is diverging, not meeting bad batches: it stops as
      abort does, and the batches those rollbacks dropped are taken off the list again.
    """

    def __init__(self, policy: str, workdir):
        self.policy, self._workdir = policy, storage.as_path(workdir)
        self.skipped = read_skipped_batches(self._workdir)
        self.dropped = {entry["position"] for entry in self.skipped}
        self.position = 0  # of the next batch in the data stream
        self._initial_data = None
        self._rollbacks: list[dict] = []  # dropped since the last save (ROLLBACK_LIMIT)
        self._unchecked: list = []  # (step, position, metrics) whose flag is unread
        self._skips_in_a_row = 0  # skip: steps skipped up to the last logged one

    def start(self, step: int, data_iterator) -> None:
        """Training goes on from `step` (restored or initial) with `data_iterator` there."""
        self.position = _data_position(step, self.dropped)
        # Rolling back before the first checkpoint returns to the start: the data's too.
        at_start = self.policy == "rollback" and step == 0
        self._initial_data = copy.deepcopy(data_iterator.get_state()) if at_start else None

    def next_batch(self, data_iterator):
        """(the next batch, its position in the data stream)."""
        while self.position in self.dropped:
            next(data_iterator)
            self.position += 1
        self.position += 1
        return next(data_iterator), self.position - 1

    def record(self, step: int, position: int, metrics) -> None:
        self._unchecked.append((step, position, metrics))

    def saved(self) -> None:
        """A checkpoint was saved: the rollbacks before it do not count to ROLLBACK_LIMIT."""
        self._rollbacks = []

    def first_bad(self):
        """(step, batch position, host metrics) of the first unchecked step that was not
        finite, or None. Reads the flags (call it where the loop syncs anyway)."""
        checking, self._unchecked = self._unchecked, []
        if self.policy == "skip" or not checking:  # skip: the step undid it; nothing to do
            return None
        flags = jax.device_get([m["finite"] for _, _, m in checking])
        for (step, position, metrics), flag in zip(checking, flags, strict=True):
            if not np.all(flag):  # pmap: one per device, all equal
                return step, position, jax.device_get(metrics)
        return None

    def handle(self, bad, checkpointer, trainer, data_iterator, seed: int):
        """abort: raise. rollback: restore the last good state and drop the bad step's batch;
        -> (device state, step) to go on from."""
        bad_step, bad_position, metrics = bad
        last, kept = last_good_checkpoint(checkpointer)
        what = _describe_nonfinite(bad_step, metrics)
        if self.policy == "abort":
            raise NonFiniteError(
                f"{what}. Stopped (train.nonfinite=abort), saving nothing after it: {kept}. "
                f"{_LOWER_LR}; or set train.nonfinite=skip or rollback to train past bad batches."
            )
        if last is None and self._initial_data is None:  # resumed; the checkpoints are gone
            raise NonFiniteError(
                f"{what}, and there is no checkpoint in {self._workdir} to roll back to. "
                f"{_LOWER_LR}."
            )
        if len(self._rollbacks) >= ROLLBACK_LIMIT:
            self._give_up(what, kept)
        if last is not None:
            restored_step, host = checkpointer.restore(trainer.abstract_state, data_iterator)
        else:
            restored_step, host = 0, trainer.init_fn(seed)
            data_iterator.set_state(copy.deepcopy(self._initial_data))
        entry = {"position": bad_position, "step": bad_step, "restored_step": restored_step}
        self.skipped.append(entry)
        self._rollbacks.append(entry)
        self.dropped.add(bad_position)
        _write_skipped_batches(self._workdir, self.skipped)
        self.position = _data_position(restored_step, self.dropped)
        logging.warning(
            "%s. Rolled back to step %d (train.nonfinite=rollback); batch %d of the data "
            "stream is dropped, recorded in %s",
            what,
            restored_step,
            bad_position,
            self._workdir / SKIPPED_BATCHES,
        )
        return trainer.to_device_state(host), restored_step

    def _give_up(self, what: str, kept: str) -> None:
        """ROLLBACK_LIMIT rollbacks with no save between: the run diverges. Their batches are
        taken off the list again; raises NonFiniteError."""
        again = {entry["position"] for entry in self._rollbacks}
        self.skipped = [entry for entry in self.skipped if entry["position"] not in again]
        self.dropped.difference_update(again)
        _write_skipped_batches(self._workdir, self.skipped)
        raise NonFiniteError(
            f"{what}, after {len(self._rollbacks)} rollbacks (train.nonfinite=rollback) with no "
            f"checkpoint saved in between: the run diverges rather than meeting bad batches. "
            f"Stopped: {kept}, and the batches those rollbacks dropped ({sorted(again)}) are not "
            f"recorded in {SKIPPED_BATCHES}. {_LOWER_LR}."
        )

    def log_fields(self, steps, host_metrics) -> dict:
        """What a log line says of non-finite steps (``nonfinite_skipped``), warning of the
        steps that skip left out; counts skip's steps in a row for `check_skip_limit`."""
        if self.policy == "skip":
            total = int(host_metrics[-1]["nonfinite_skipped"])
            skipped_now = [s for s, m in zip(steps, host_metrics, strict=True) if not m["finite"]]
            if skipped_now:
                logging.warning(
                    "steps %s were not finite and changed nothing (train.nonfinite=skip); "
                    "%d skipped in all",
                    skipped_now,
                    total,
                )
            for m in host_metrics:
                self._skips_in_a_row = 0 if m["finite"] else self._skips_in_a_row + 1
            return {"nonfinite_skipped": total}
        if self.policy == "rollback" or self.dropped:
            return {"nonfinite_skipped": sum(p < self.position for p in self.dropped)}
        return {}

    def check_skip_limit(self, step: int, checkpointer) -> None:
        """NonFiniteError after SKIP_LIMIT skipped steps in a row: the state is broken."""
        if self._skips_in_a_row >= SKIP_LIMIT:
            raise NonFiniteError(
                f"steps {step - self._skips_in_a_row + 1} to {step} were all not finite and "
                f"changed nothing (train.nonfinite=skip): {SKIP_LIMIT} or more in a row mean the "
                f"state, not a batch, is broken. Stopped: {last_good_checkpoint(checkpointer)[1]}. "
                f"{_LOWER_LR}."
            )


def last_good_checkpoint(checkpointer) -> tuple[int | None, str]:
    """(the last checkpoint's step or None, a phrase for messages), after the saves in flight
    have landed (they hold states from before any non-finite step)."""
    checkpointer.wait()
    last = checkpointer.latest_step()
    if last is None:
        return last, "no checkpoint had been saved"
    return last, f"the last checkpoint (step {last}) is kept"
