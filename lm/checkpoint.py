"""Orbax checkpoints of the training state and the data-iterator state.

Layout of a workdir:
    config.json                 the resolved experiment config (written once, never overwritten)
    checkpoints/<step>/state    params, optimizer state, step, RNG (Orbax, sharded, async)
    checkpoints/<step>/data     data-iterator state: one JSON per data shard
                                (`shard_3-of-8.json`, written by the process reading it), so
                                a run resumes on another number of processes; iterators
                                without shards: one JSON per process
A corrupt or incomplete latest checkpoint falls back to an earlier one with a warning; a
checkpoint of another model shape is a clear error and is left untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lm.models.transformer import EXECUTION_FIELDS, scanned_period, stack_layers, unstack_layers


class CheckpointMismatchError(ValueError):
    """The workdir holds a run that the current config cannot continue."""


class DataStateHandler(ocp.CheckpointHandler):
    """Orbax handler for data iterators: one JSON file per data shard.

    An iterator with `shard_names` (lm.data.pipeline's) has a state `{shard name: state}`;
    each process writes the shards it reads and reads back the shards it now holds, whatever
    process wrote them. Other iterators (e.g. a plain Grain one) use one file per process.
    """

    def save(self, directory: epath.Path, args: DataSave):
        state = args.item.get_state()
        if hasattr(args.item, "shard_names"):
            for name in args.item.shard_names:
                (directory / f"{name}.json").write_text(json.dumps(state[name]))
        else:
            (directory / _process_file()).write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: DataRestore):
        iterator = args.item
        if not hasattr(iterator, "shard_names"):
            iterator.set_state(json.loads((directory / _process_file()).read_text()))
            return iterator
        state = {}
        for name in iterator.shard_names:
            path = directory / f"{name}.json"
            if not path.exists() and iterator.shard_names == ["shard_0-of-1"]:
                path = directory / "process_0-of-1.json"  # written before data shards existed
            if not path.exists():
                saved = sorted(p.name for p in directory.iterdir())
                raise CheckpointMismatchError(
                    f"the checkpoint's data state ({directory}: {saved}) has no {name}.json: it was "
                    "saved with another number of data shards. Resume with the data.shards (and, "
                    "if it was 0, the number of processes) the run was saved with; set data.shards "
                    "explicitly to move a run between process counts."
                )
            state[name] = json.loads(path.read_text())
        iterator.set_state(state)
        return iterator

    def metadata(self, directory: epath.Path):
        return None

    def structure(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


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
            items["data"] = DataSave(data_iterator)
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
            try:
                restored = self._restore_step(candidate, abstract_state, data_iterator)
            except CheckpointMismatchError:
                raise
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

    def _saved_tree(self, step: int):
        """The saved state's tree of array metadata (no array is read)."""
        return ocp.PyTreeCheckpointHandler().metadata(self.manager.directory / str(step) / "state").tree

    def _restore_step(self, step: int, abstract_state, data_iterator):
        """One step's items. A checkpoint saved in the other layer layout (unrolled `layer_i`
        before scanned layers existed, or with another `model.scan_layers`) is read onto the
        host in its own layout, converted, and laid out with the target shardings."""
        items = {}
        if data_iterator is not None:
            items["data"] = DataRestore(data_iterator)
        saved_period = scanned_period(self._saved_tree(step))
        target_period = scanned_period(abstract_state)
        if saved_period == target_period:
            items["state"] = ocp.args.StandardRestore(abstract_state)
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        unrolled = unstack_layers(abstract_state)
        saved_like = stack_layers(unrolled, saved_period) if saved_period else unrolled
        # A checkpointer of its own: the manager keeps one handler type per item, and it saves
        # the state with the standard handler.
        saved = ocp.PyTreeCheckpointer().restore(
            self.manager.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                item=saved_like,
                restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_like)))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
        state = unstack_layers(saved)
        state = stack_layers(state, target_period) if target_period else state
        logging.info("converted checkpoint %d from %s to %s layers", step,
                     f"scanned (period {saved_period})" if saved_period else "unrolled",
                     f"scanned (period {target_period})" if target_period else "unrolled")
        shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
        return {**restored, "state": jax.device_put(state, shardings)}

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
    """The workdir's config.json (None if there is none); ValueError naming it if unreadable."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from a copy, or start a new "
                         "--workdir") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a config; restore it from a "
                         "copy, or start a new --workdir")
    return config


def check_compatible(saved: dict[str, Any] | None, current: dict[str, Any], sections=("model",)) -> None:
    """Refuses to resume a run whose model differs: names each differing key."""
    if saved is None:
        return
    diffs = []
    for section in sections:
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if section == "model" and key in EXECUTION_FIELDS:
                continue  # how the model runs (layer layout, kernels): checkpoints convert
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: saved {old.get(key)!r}, now {new.get(key)!r}")
    if diffs:
        raise CheckpointMismatchError(
            "this workdir holds a run of a different model; refusing to touch it. Differences: "
            + "; ".join(diffs)
            + ". Use a new --workdir, or pass the saved values."
        )
