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
import errno
import json
import logging
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lm import lora, storage
from lm.data import pipeline
from lm.data.pipeline import DataConfig
from lm.models.transformer import (
    EXECUTION_FIELDS,
    ModelConfig,
    scanned_period,
    stack_layers,
    to_layout,
    unstack_layers,
)
from lm.utils import tree_differences


class CheckpointMismatchError(ValueError):
    """The workdir holds a run that the current config cannot continue."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, a quota, a file-size limit, ...). The
    message names the step, the path, the free space and the last complete checkpoint."""


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


def check_checkpoint_store(workdir: storage.PathLike) -> None:
    """Orbax 0.12 writes arrays through TensorStore to local paths and gs:// only: its path
    handling turns `s3://b/x` into `s3:/b/x` and writes a local directory named `s3:`. So an
    s3:// workdir is refused before anything is written (other outputs, such as `eval --out
    s3://...`, go through epath and work)."""
    if str(workdir).startswith("s3://"):
        raise ValueError(
            f"--workdir {workdir}: checkpoints cannot be written to S3 with orbax-checkpoint "
            f"{ocp.__version__} (it supports local paths and gs:// only); use a gs:// or local "
            "--workdir, or mount the bucket (e.g. mountpoint-s3) and pass its path. "
            "`eval`/`icl --out s3://...` do write to S3"
        )


def checkpoints_dir(workdir: storage.PathLike) -> epath.Path:
    """<workdir>/checkpoints, absolute (Orbax requires it) for a local workdir."""
    check_checkpoint_store(workdir)
    workdir = storage.as_path(workdir)
    return (workdir if storage.is_remote(workdir) else workdir.absolute()) / "checkpoints"


def _manager(
    workdir: storage.PathLike, keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        checkpoints_dir(workdir), options=options, item_names=("state", "data")
    )


class Checkpointer:
    """Saves and restores (TrainState, data iterator) pairs in `<workdir>/checkpoints`."""

    def __init__(self, workdir: storage.PathLike, keep: int = 3, async_save: bool = True):
        self.workdir = storage.as_path(workdir)
        self.manager = _manager(workdir, keep, async_save)
        self._in_flight = None  # the step of the save being written in the background

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Starts saving `step` (in the background when async). A save that fails, this one or
        the one still in flight, raises CheckpointSaveError; the failed step is not committed."""
        self.wait()  # the previous save: a failure is reported as that step's
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = DataSave(data_iterator)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - any failed write: one clear error (the cause chained)
            raise self._save_failed(step, e) from e
        self._in_flight = step if saved else None
        return saved

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores into `abstract_state` (a tree of ShapeDtypeStruct with shardings).

        Tries the requested (or latest) step, then earlier ones if a checkpoint is unreadable.
        Returns (step, state); the data iterator is restored in place. Raises
        CheckpointMismatchError when the saved arrays do not fit the abstract state.

        Each step is first inspected (`_inspect`): a step whose directory, commit marker or
        metadata is missing or unreadable is unreadable; one whose readable metadata describes
        another tree (paths, shapes or dtypes; layer layouts compared unrolled) is a mismatch,
        raised before anything is moved. A step that passes and still fails to restore has
        array files that cannot be read (truncated, garbage): unreadable. Unreadable steps fall
        back to the previous one with a warning and are set aside (`_set_aside`).
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        last_error = None
        unreadable = []
        for i, candidate in enumerate(steps):
            problem = self._inspect(candidate, abstract_state)  # raises CheckpointMismatchError
            if problem is None:
                try:
                    restored = self._restore_step(candidate, abstract_state, data_iterator)
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # noqa: BLE001 - the metadata fit, so the array files are bad
                    problem = f"its array files cannot be read ({type(e).__name__}: {e})"
                else:
                    self._set_aside(unreadable)
                    return candidate, restored["state"]
            last_error = f"step {candidate}: {problem}"
            later = steps[i + 1] if i + 1 < len(steps) else None
            logging.warning(
                "checkpoint %d in %s is unreadable: %s; %s",
                candidate,
                self.workdir,
                problem,
                f"falling back to step {later}"
                if later is not None
                else "no earlier step to fall back to",
            )
            unreadable.append(candidate)
        raise RuntimeError(f"no readable checkpoint in {self.workdir}: {last_error}")

    def _inspect(self, step: int, abstract_state) -> str | None:
        """What makes `step` unreadable (None if nothing does), decided from the checkpoint's
        own files: no exception text is read. Raises CheckpointMismatchError when its metadata
        is readable and describes another model than `abstract_state`."""
        saved, problem = _inspect_step(epath.Path(self.manager.directory) / str(step))
        if problem is not None:
            return problem
        diffs = _tree_differences(unstack_layers(saved), unstack_layers(abstract_state))
        if diffs:
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.workdir} does not match the model being "
                f"built (layers compared unrolled): {'; '.join(diffs[:5])}"
                + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
                + ". Use a new --workdir, or restore the config the run was started with "
                "(config.json in the workdir). Nothing was moved."
            )
        return None

    def _saved_tree(self, step: int):
        """The saved state's tree of array metadata (no array is read)."""
        return _saved_tree(epath.Path(self.manager.directory) / str(step))

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
            self.manager.directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=saved_like,
                restore_args=jax.tree.map(
                    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_like
                ),
            ),
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
        state = unstack_layers(saved)
        state = stack_layers(state, target_period) if target_period else state
        logging.info(
            "converted checkpoint %d from %s to %s layers",
            step,
            f"scanned (period {saved_period})" if saved_period else "unrolled",
            f"scanned (period {target_period})" if target_period else "unrolled",
        )
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
                storage.move(source, aside / f"{step}-{int(time.time())}")
        self.manager.reload()

    def wait(self):
        """Waits for the save in flight; CheckpointSaveError if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - see save()
            raise self._save_failed(step, e) from e

    def close(self):
        self.wait()
        self.manager.close()

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointSaveError:
        """The error for a failed save of `step`: its partial files are removed (they are in
        Orbax's temporary directory, never taken for a checkpoint, and take space), and the
        message says why, how much space is free, what is kept and what to do."""
        directory = epath.Path(self.manager.directory)
        if step is not None and jax.process_index() == 0:
            for partial in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                partial.rmtree(missing_ok=True)
        try:
            self.manager.reload()
            last = self.manager.latest_step()
        except Exception as e:  # noqa: BLE001 - the message must not fail in turn; it says so instead
            kept = f"the complete checkpoints could not be listed ({type(e).__name__}: {e})"
        else:
            kept = (
                f"the last complete checkpoint (step {last}) is intact and a rerun resumes from it"
                if last is not None
                else "no complete checkpoint was saved before it"
            )
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointSaveError(
            f"could not save {what} to {directory / str(step) if step is not None else directory}: "
            f"{_write_failure(error)}. {_free_space(directory)}. The partial checkpoint was not kept; "
            f"{kept}. Free some space (or raise the limit), or rerun with a --workdir on a disk "
            "with room (copy the workdir there first to keep its checkpoints)."
        )


def _saved_tree(directory: epath.Path):
    """The tree of array metadata of the state saved in the step `directory` (no array read)."""
    return ocp.PyTreeCheckpointHandler().metadata(directory / "state").tree


def _inspect_step(directory: epath.Path):
    """(saved state as a tree of ShapeDtypeStructs, None), or (None, what makes the checkpoint
    step at `directory` unreadable), decided from the step's own files: its directory, commit
    marker and metadata. No exception text is read and no array is."""
    if not directory.is_dir():
        return None, f"{directory} is missing"
    if not any(directory.iterdir()):
        return None, f"{directory} is empty"
    if not ocp.step.is_path_finalized(directory):
        return None, f"{directory} was never finalized"
    step_metadata = _read_json(directory / "_CHECKPOINT_METADATA")
    committed = (directory / "commit_success.txt").is_file() or (
        isinstance(step_metadata, dict) and step_metadata.get("commit_timestamp_nsecs")
    )
    if not committed:
        return None, (
            f"{directory} has no commit marker (commit_success.txt or a commit time in "
            "_CHECKPOINT_METADATA)"
        )
    state_dir = directory / "state"
    if not state_dir.is_dir():
        return None, f"{state_dir} is missing"
    tree_metadata = _read_json(state_dir / "_METADATA")
    if not isinstance(tree_metadata, dict) or not isinstance(
        tree_metadata.get("tree_metadata"), dict
    ):
        return None, f"{state_dir / '_METADATA'} is missing or not Orbax tree metadata"
    try:
        saved = _saved_tree(directory)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved), None
    except Exception as e:  # noqa: BLE001 - any failure to parse the metadata makes it unreadable
        return None, f"its metadata cannot be parsed ({type(e).__name__}: {e})"


def _read_json(path: epath.Path):
    """The parsed JSON file at `path`, or None if it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _tree_differences(saved, wanted) -> list[str]:
    """Each path present in only one tree, or with another shape or dtype: parameters first,
    then the rest (optimizer state, ...), each sorted by path."""
    diffs = sorted(
        tree_differences(saved, wanted, dtypes=True),
        key=lambda d: (not d[0].startswith("params/"), d[0]),
    )
    return [
        f"{name} only in the model"
        if old is None
        else f"{name} only in the checkpoint"
        if new is None
        else f"{name}: saved {old[0]} {old[1]}, model {new[0]} {new[1]}"
        for name, old, new in diffs
    ]


_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file would exceed the file-size limit (ulimit -f)",
}


def _write_failure(error: Exception) -> str:
    """Why a write failed, from an OSError or the OS error code in a TensorStore error's text
    (Orbax reports array writes as `ValueError: OUT_OF_RANGE: ... [os_error_code='28']`)."""
    code = getattr(error, "errno", None)
    if code is None:
        match = re.search(r"os_error_code='?(\d+)", str(error))
        code = int(match.group(1)) if match else None
    if code in _WRITE_ERRNOS:  # the full error (a temporary file's path) is chained: LM_DEBUG=1
        return f"{_WRITE_ERRNOS[code]} ({errno.errorcode[code]}: {os.strerror(code)})"
    cause = f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0]
    return cause if len(cause) <= 600 else cause[:300] + " ... " + cause[-300:]


def _free_space(directory: epath.Path) -> str:
    if storage.is_remote(directory):
        return f"{directory} is on an object store, which reports no free space (check its quota)"
    path = directory
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError as e:
        return f"The free space on {path} is unknown ({e})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem of {path}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def read_config(workdir: storage.PathLike) -> dict[str, Any] | None:
    """The workdir's config.json (None if there is none); ValueError naming it if unreadable."""
    path = storage.as_path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); restore it from a copy, or start a new --workdir"
        ) from e
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} holds a {type(config).__name__}, not a config; restore it from a "
            "copy, or start a new --workdir"
        )
    return config


def check_compatible(
    saved: dict[str, Any] | None, current: dict[str, Any], sections=("model",)
) -> None:
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


# ------------------------------------------------------------------ reading for inference
# Sampling, evaluating, exporting and fine-tuning from a workdir need its model, parameters and
# tokenizer, not its optimizer: the readers below build no trainer and compile nothing.

# What reading the arrays of a step whose metadata is sound raises when its files are damaged
# (TensorStore reports a truncated or garbled file as a ValueError, a missing one as an OSError).
DAMAGED_ARRAY_ERRORS = (ValueError, OSError)


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """A model read for inference.

    config: the ModelConfig (vocab_size resolved), in the layer layout `params` are in.
    params: host (numpy) parameter tree; a LoRA run's adapters are merged into its base.
    tokenizer: the run's Tokenizer, an import's PretrainedTokenizer, or None (an import
      without one).
    sections: the run's config.json ({section: values}); {"model": ...} for an import.
    step: the step of the checkpoint read; None for an import.
    source: the workdir, or the import's spec, as the user named it.
    imported: the `lm.convert.Pretrained` an import came from (its tokenizer files and
      source config.json are kept by an export); None for a workdir.
    """

    config: ModelConfig
    params: Any
    tokenizer: Any
    sections: dict[str, Any]
    step: int | None
    source: str
    imported: Any = None

    @property
    def data_config(self) -> DataConfig:
        """The run's data section (the defaults for an import)."""
        return DataConfig.from_dict(self.sections.get("data", {}))


def _reading_manager(workdir: storage.PathLike) -> ocp.CheckpointManager | None:
    """A manager that only reads `<workdir>/checkpoints`: it creates and cleans up nothing, so it
    is safe on the workdir of a run that is still training. None if there is no such folder."""
    directory = checkpoints_dir(workdir)
    if not directory.is_dir():
        return None
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
        # Handlers for both items, so that Orbax does not warn about the one not read.
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": DataStateHandler()},
    )


def latest_saved_step(workdir: storage.PathLike) -> int | None:
    """The newest step `<workdir>/checkpoints` lists (readable or not); None if there is none."""
    manager = _reading_manager(workdir)
    if manager is None:
        return None
    try:
        return manager.latest_step()
    finally:
        manager.close()


def has_checkpoint(workdir: storage.PathLike) -> bool:
    """Whether `<workdir>/checkpoints` lists a step (readable or not)."""
    return latest_saved_step(workdir) is not None


def saved_run(workdir: storage.PathLike) -> tuple[dict[str, Any] | None, int | None]:
    """(config.json, newest step) of the run whose checkpoints the workdir holds; (None, None)
    when it holds none: a config.json without checkpoints (a first run that failed before its
    first save) is not a run to resume, and the next start writes its own."""
    step = latest_saved_step(workdir)
    return (read_config(workdir), step) if step is not None else (None, None)


def is_lm_workdir(path: storage.PathLike) -> bool:
    """A workdir of ours: config.json with our sections, or a checkpoints folder. (A Hugging Face
    model folder also holds a config.json, but without 'model' and 'train' in it.)"""
    path = storage.as_path(path)
    if (path / "checkpoints").is_dir():
        return True
    try:
        saved = read_config(path)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "model" in saved and "train" in saved


def read_params(workdir: storage.PathLike, sections: dict[str, Any]) -> tuple[int, Any]:
    """(step, host parameters) of the workdir's latest readable checkpoint, in the layer layout
    it was saved in.

    Reads only the `params` (and, for a LoRA run, `frozen`) items of the state, never the
    optimizer's. A LoRA run's adapters are merged into its frozen base (with the rank and alpha
    of `sections["train"]`, the run's config.json). A step that is unreadable (judged as
    `Checkpointer.restore` judges it) falls back to the one before it with a warning naming
    both; nothing is moved. ValueError if no step is readable.
    """
    manager = _reading_manager(workdir)
    steps = sorted(manager.all_steps(), reverse=True) if manager is not None else []
    problem = "it has no checkpoints" if not steps else None
    try:
        for i, step in enumerate(steps):
            saved, problem = _inspect_step(epath.Path(manager.directory) / str(step))
            if problem is None:
                wanted = {k: saved[k] for k in ("params", "frozen") if k in saved}
                as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
                args = ocp.args.PyTreeRestore(
                    item=wanted, restore_args=as_numpy, partial_restore=True
                )
                try:
                    restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
                    break
                except DAMAGED_ARRAY_ERRORS as e:  # the metadata was sound: the array files are not
                    problem = f"its array files cannot be read ({type(e).__name__}: {e})"
            later = steps[i + 1] if i + 1 < len(steps) else None
            logging.warning(
                "checkpoint %d in %s is unreadable: %s; %s",
                step,
                workdir,
                problem,
                f"falling back to step {later}"
                if later is not None
                else "no earlier step to fall back to",
            )
        else:
            raise ValueError(
                f"no readable checkpoint in {workdir}: "
                + (f"step {steps[-1]}: {problem}" if steps else problem)
                + f" (tried steps {sorted(steps)}); copy back a good checkpoint, or train again "
                "in a new --workdir"
            )
    finally:
        if manager is not None:
            manager.close()
    logging.info("parameters of %s at step %d", workdir, step)
    if "frozen" not in restored:
        return step, restored["params"]
    train = sections.get("train", {})
    scale = train.get("lora_alpha", lora.LoraConfig.alpha) / train["lora_rank"]
    return step, jax.device_get(lora.merge(restored["frozen"], restored["params"], scale))


def read_model(workdir: storage.PathLike) -> SavedModel:
    """The model, host parameters and tokenizer of a trained workdir's latest readable
    checkpoint, with its config.json sections. Builds no optimizer and compiles nothing; writes
    nothing, so it is safe on the workdir of a run still training. ValueError, naming the fix,
    for a workdir without config.json, without a checkpoint, or with none readable."""
    sections = read_config(workdir)
    if sections is None:
        raise ValueError(
            f"{workdir} has no config.json: train there first, or pass the right --workdir"
        )
    if not has_checkpoint(workdir):
        raise ValueError(
            f"{workdir} has no checkpoint yet: train there first (a run saves every "
            "train.checkpoint_every steps and at the end)"
        )
    data = DataConfig.from_dict(sections.get("data", {}))
    # The tokenizer first: a fine-tune's config may leave model.vocab_size to it.
    tokenizer = pipeline.saved_tokenizer(data, workdir)
    model = dict(sections.get("model", {}))
    model["vocab_size"] = model.get("vocab_size") or tokenizer.vocab_size
    config = ModelConfig.from_dict(model)
    step, params = read_params(workdir, sections)
    return SavedModel(
        config=config,
        params=to_layout(params, config),  # a resume may have changed model.scan_layers
        tokenizer=tokenizer,
        sections=sections,
        step=step,
        source=str(workdir),
    )
