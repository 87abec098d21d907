"""Orbax checkpoints of the training state and the data-iterator state.

Layout of a workdir:
    config.json                 the resolved experiment config (written once, never overwritten)
    checkpoints/<step>/state    params, optimizer state, step, RNG (Orbax, sharded, async)
    checkpoints/<step>/data     Grain iterator state (one JSON per process)
A corrupt or incomplete latest checkpoint falls back to an earlier one with a warning; a
checkpoint of another model shape is a clear error and is left untouched.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The workdir holds a run that the current config cannot continue."""


def _manager(workdir: str | pathlib.Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


class Checkpointer:
    """Saves and restores (TrainState, data iterator) pairs in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.manager = _manager(workdir, keep, async_save)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores into `abstract_state` (a tree of ShapeDtypeStruct with shardings).

        Tries the requested (or latest) step, then earlier ones if a checkpoint is unreadable.
        Returns (step, state); the data iterator is restored in place. Raises
        CheckpointMismatchError when the saved arrays do not fit the abstract state.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        last_error = None
        unreadable = []
        for candidate in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except (ValueError, TypeError) as e:
                if _is_shape_mismatch(e):
                    raise CheckpointMismatchError(
                        f"the checkpoint at step {candidate} in {self.workdir} does not match the "
                        f"model being built ({e}). Use a new --workdir, or restore the config the "
                        "run was started with (config.json in the workdir)."
                    ) from e
                last_error = e
            except Exception as e:  # noqa: BLE001 - unreadable files: try an older checkpoint
                last_error = e
            else:
                self._set_aside(unreadable)
                return candidate, restored["state"]
            logging.warning("checkpoint %s is unreadable (%s); trying an earlier one", candidate, last_error)
            unreadable.append(candidate)
        raise RuntimeError(f"no readable checkpoint in {self.workdir}: {last_error}")

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints to <workdir>/unreadable_checkpoints/ (kept, not deleted),
        so that training can save those steps again."""
        if not steps or jax.process_index() != 0:
            return
        aside = self.workdir / "unreadable_checkpoints"
        aside.mkdir(exist_ok=True)
        for step in steps:
            source = self.workdir / "checkpoints" / str(step)
            if source.exists():
                source.rename(aside / f"{step}-{int(time.time())}")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _is_shape_mismatch(error: Exception) -> bool:
    text = str(error).lower()
    return "shape" in text or "mismatch" in text or "structure" in text or "tree" in text


def write_config(workdir: str | pathlib.Path, config: dict[str, Any]) -> None:
    """Writes config.json if absent (atomic); an existing one is never overwritten."""
    path = pathlib.Path(workdir) / "config.json"
    if path.exists() or jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    tmp.rename(path)


def read_config(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    path = pathlib.Path(workdir) / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_compatible(saved: dict[str, Any] | None, current: dict[str, Any], sections=("model",)) -> None:
    """Refuses to resume a run whose model differs: names each differing key."""
    if saved is None:
        return
    diffs = []
    for section in sections:
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: saved {old.get(key)!r}, now {new.get(key)!r}")
    if diffs:
        raise CheckpointMismatchError(
            "this workdir holds a run of a different model; refusing to touch it. Differences: "
            + "; ".join(diffs)
            + ". Use a new --workdir, or pass the saved values."
        )
