"""What a workdir's run is, and what changed each time it was resumed.

A trainer starting in a workdir records the run's identity: the resolved config (config.json),
a fingerprint of its training data's files and of its tokenizer. Resuming compares the new
command's against it:

- keys that do not change the run's mathematics (`FREE_KEYS`: steps, logging, evaluation,
  checkpoint cadence, how it is laid out on devices) may change, and are recorded;
- every other key (data, model, batch, optimizer, schedule, seed), the data's files and the
  tokenizer are refused in one line that names them and the override that accepts them,
  ``--config.train.allow_changes=KEY,...``; an accepted change is recorded too.

The record is WORKDIR/history.json, a list with one entry per start: its step, time, host,
the fingerprints and the changes. config.json is always the config of the run whose
checkpoints the workdir holds: a start without checkpoints (a first run, or a rerun after one
that failed before its first save) writes it anew.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import jax

from lm import storage
from lm.models.transformer import EXECUTION_FIELDS

HISTORY_FILE = "history.json"
CONFIG_FILE = "config.json"

# Per section, the keys a resumed run may change freely. `None`: the whole section.
FREE_KEYS: dict[str, Any] = {
    "train": {
        "steps",  # with optimizer.decay_steps=0 it is the schedule's length too: warned
        "log_every",
        "eval_every",
        "eval_batches",
        "eval_at_start",
        "eval_tasks",
        "eval_tasks_limit",
        "eval_tasks_fewshot",
        "checkpoint_every",
        "keep_checkpoints",
        "async_checkpoints",
        "nonfinite",
        "sample_prompt",
        "sample_tokens",
        "sample_temperature",
        "peak_flops_per_device",
        "progress",
        "init_from",  # read only when the workdir has no checkpoints
        "allow_changes",
        "lease_timeout_s",
        "loggers",  # where metrics are shown, not what they are
        "wandb_project",
        "wandb_entity",
    },
    "model": set(EXECUTION_FIELDS),
    # Where data is prepared and read from, not what it is (the files' fingerprint is compared).
    # mixture_schedule: new weights from a step on are how a mixture is meant to change.
    "data": {"data_dir", "worker_count", "cache", "tokenizer_max_chars", "mixture_schedule"},
    "parallel": None,
}
# Pseudo-keys for what the config does not hold.
DATA_FILES, TOKENIZER = "data.files", "tokenizer"


class RunChangedError(ValueError):
    """A resume that would change the run's mathematics (one line, exit 2 at the CLI)."""


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    """{section: {key: value}} -> {'section.key': value}."""
    return {
        f"{section}.{key}": value
        for section, keys in values.items()
        if isinstance(keys, dict)
        for key, value in keys.items()
    }


def _warn_if_schedule_follows_steps(changes: dict[str, list], values: dict[str, Any]) -> None:
    """train.steps may change; with optimizer.decay_steps=0 the schedule decays over it, so a
    longer run also decays more slowly from here on: said, since it changes the mathematics."""
    if "train.steps" in changes and not values.get("optimizer", {}).get("decay_steps", 1):
        old = changes["train.steps"][0]
        logging.warning(
            "train.steps %s -> %s also stretches the learning-rate schedule "
            "(optimizer.decay_steps=0 decays over train.steps); pass "
            "--config.optimizer.decay_steps=%s to keep the schedule of the first %s steps",
            old,
            changes["train.steps"][1],
            old,
            old,
        )


def is_free(key: str) -> bool:
    section, _, name = key.partition(".")
    free = FREE_KEYS.get(section, set())
    return free is None or name in free


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list]:
    """{'section.key': [saved, now]} for every key whose value differs (JSON-normalised)."""
    old, new = (
        _flat(json.loads(json.dumps(saved, default=str))),
        _flat(json.loads(json.dumps(current, default=str))),
    )
    return {
        k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    }


def _describe(key: str, old, new, values: dict[str, Any]) -> str:
    if key == DATA_FILES:
        return f"data.files (the files of the training data changed since step {old})"
    if key == TOKENIZER:
        return "tokenizer (the tokenizer file is not the one the run was trained with)"
    return f"{key} {old!r} -> {new!r}"


def read_history(workdir: storage.PathLike) -> list[dict[str, Any]]:
    path = storage.as_path(workdir) / HISTORY_FILE
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); restore it from a copy, or delete it (the next "
            "start records the run anew)"
        ) from e
    return history if isinstance(history, list) else []


def check_resume(
    saved: dict[str, Any],
    last: dict[str, Any],
    values: dict[str, Any],
    fingerprints: dict[str, str],
    step: int,
) -> tuple[dict[str, list], dict[str, list]]:
    """(free changes, accepted changes) of resuming the run `saved` (its config.json; `last`,
    its newest history entry) at `step` with `values` and the data's and tokenizer's
    `fingerprints`. RunChangedError naming the other changes and how to accept them."""
    changes = differences(saved, values)
    for key in (DATA_FILES, TOKENIZER):
        if last.get(key) and fingerprints.get(key) and last[key] != fingerprints[key]:
            changes[key] = [last.get("step", 0), step]
    allowed = {k.strip() for k in values.get("train", {}).get("allow_changes", "").split(",")}
    refused = {k: v for k, v in changes.items() if not is_free(k) and k not in allowed}
    if refused:
        named = "; ".join(_describe(k, *v, values) for k, v in refused.items())
        accept = ",".join(sorted(set(refused) | (allowed & set(changes))))
        raise RunChangedError(
            f"resuming this workdir at step {step} would change the run's mathematics: {named}. "
            "Rerun with the saved values (its config.json), use a new --workdir, or accept the "
            f"change with --config.train.allow_changes={accept}"
        )
    free = {k: v for k, v in changes.items() if is_free(k)}
    _warn_if_schedule_follows_steps(free, values)
    accepted = {k: v for k, v in changes.items() if not is_free(k)}
    return free, accepted


def start_entry(
    workdir: storage.PathLike,
    values: dict[str, Any],
    fingerprints: dict[str, str],
    step: int | None,
    saved: dict[str, Any] | None,
) -> dict[str, Any]:
    """The history entry of this start, a resume checked first (`check_resume`: raises before
    anything is written). step, saved: the workdir's newest checkpoint step and config.json
    (None, None without checkpoints: a fresh start, whatever files a failed run left)."""
    entry: dict[str, Any] = {
        "step": step or 0,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        **fingerprints,
    }
    if step is not None and saved is not None:
        history = read_history(workdir)
        last = history[-1] if history else {}
        entry["changes"], entry["accepted"] = check_resume(saved, last, values, fingerprints, step)
    return entry


def write_start(workdir: storage.PathLike, values: dict[str, Any], entry: dict[str, Any]) -> None:
    """Records a start (process 0): config.json becomes `values`, history.json gains `entry`
    (it starts anew with a fresh start, one without "changes")."""
    if jax.process_index() != 0:
        return
    workdir = storage.as_path(workdir)
    history = read_history(workdir) if "changes" in entry else []
    storage.write_atomic(
        workdir / CONFIG_FILE, json.dumps(values, indent=2, sort_keys=True, default=str)
    )
    storage.write_atomic(workdir / HISTORY_FILE, json.dumps([*history, entry], indent=1) + "\n")
