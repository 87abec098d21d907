"""Where the loop writes metrics: `metrics.jsonl` (always), and the experiment trackers that
`train.loggers` names: TensorBoard event files (local or on an object store), Weights & Biases.
Each tracker also records the run's config and the code's version once, when it opens.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from lm import storage
from lm.train.config import parse_loggers
from lm.utils import code_version


class _StoreRecordWriter:
    """tensorboardX's record writer for gs:// and s3:// logdirs, through epath (and so through
    the same credentials and endpoints as every other file of the workdir): an object store
    cannot append, so each flush uploads the event file whole (as tensorboardX's own S3 writer
    does; event files of a run are small)."""

    def __init__(self, path: str):
        self.path, self.buffer, self.closed = storage.as_path(path), bytearray(), False

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        self.path.write_bytes(bytes(self.buffer))

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _StoreRecordWriterFactory:
    def open(self, path: str) -> _StoreRecordWriter:
        return _StoreRecordWriter(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories to create


def _register_store_writers() -> None:
    from tensorboardX import record_writer

    for scheme in storage.REMOTE_SCHEMES:
        record_writer.register_writer_factory(scheme.split(":")[0], _StoreRecordWriterFactory())


METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: storage.PathLike) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl in the order written ([] when there is none). A torn
    last line (a run killed while writing it) is left out, as `MetricWriter` drops it."""
    path = storage.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [
        json.loads(line)
        for line in path.read_text().splitlines(keepends=True)
        if line.endswith("\n") and line.strip()
    ]


def _drop_rows_after(workdir, start: int) -> None:
    """Keeps the rows of metrics.jsonl up to step `start`, where the run resumes (none for a
    fresh start): the steps after it were logged by a run stopped before it saved them, and
    are trained and logged again."""
    path = storage.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [
        line
        for line in lines
        if line.endswith("\n") and line.strip() and start > 0 and json.loads(line)["step"] <= start
    ]
    if len(kept) < len(lines):
        logging.info("%s: %d rows after step %d dropped", path, len(lines) - len(kept), start)
        storage.write_atomic(path, "".join(kept))


WANDB_RUN_ID_FILE = "wandb_run_id"


def _markdown_json(value) -> str:
    """`value` as indented JSON in a Markdown code block: TensorBoard's text tab renders
    Markdown, and a block indented by four spaces shows the JSON verbatim."""
    return "\n".join("    " + line for line in json.dumps(value, indent=2).splitlines())


class _TensorBoard:
    """Scalars in WORKDIR/tensorboard; the run's record and code version as text summaries
    (tags "config" and "code") at the step the run starts from."""

    def __init__(self, workdir, record: dict | None, code: dict, step: int):
        from tensorboardX import SummaryWriter

        _register_store_writers()
        self.writer = SummaryWriter(str(workdir / "tensorboard"))
        if record is not None:
            self.writer.add_text("config", _markdown_json(record), step)
        self.writer.add_text("code", _markdown_json(code), step)
        self.writer.flush()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _import_wandb():
    """The wandb module; ImportError naming the extra that installs it when it is missing."""
    try:
        import wandb
    except ModuleNotFoundError as e:
        if e.name != "wandb":
            raise
        raise ImportError(
            'train.loggers names wandb, which is not installed: pip install -e ".[wandb]"'
        ) from e
    return wandb


class _WandB:
    """One W&B run per workdir: its id is kept in WORKDIR/wandb_run_id, so that a resumed
    training run continues the same W&B run. W&B's files go to WORKDIR/wandb for a local
    workdir (W&B's default directory for a gs:// or s3:// one, which it cannot write to).
    The mode (online, offline, disabled) is W&B's own setting, e.g. WANDB_MODE."""

    def __init__(self, workdir, record: dict | None, code: dict, project: str, entity: str):
        wandb = _import_wandb()
        config = dict(record or {})
        if "code" in config:
            raise ValueError("the run's record has a 'code' key, which holds the code version")
        config["code"] = code
        id_file = workdir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self.run = wandb.init(
            project=project,
            entity=entity or None,
            id=run_id,
            resume="allow",
            name=workdir.name,
            dir=None if storage.is_remote(workdir) else os.fspath(workdir),
            config=config,
        )
        if run_id is None:
            storage.write_atomic(id_file, self.run.id + "\n")
        # Our step is a logged field that every chart uses as its x-axis, not W&B's own step:
        # a run resumed from step S logs again the steps after S that the killed run had
        # logged (so does a rollback), and W&B ignores, with a warning, a row whose own step
        # is below its last one. Rewinding the run to S (resume_from) is done by the W&B
        # server: an offline run accepts it and rewinds nothing. With `step` as the x-axis,
        # every row is kept; a re-logged step is a second point at the same x, with the
        # killed run's values (the same batches from the same checkpoint) up to the
        # accelerator's nondeterminism, so the charts stay right.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics})

    def close(self) -> None:
        self.run.finish()


class MetricWriter:
    """metrics.jsonl (one JSON object per logged step) and the named trackers, process 0 only.

    start: the step a training run starts from; rows after it are dropped from metrics.jsonl
      (`_drop_rows_after`). None keeps every row.
    loggers: the trackers, from `lm.train.config.LOGGERS` ("tensorboard", "wandb"); () for
      metrics.jsonl only. An unknown name is a ValueError on every process.
    record: the run's description (the resolved config, as JSON-able dicts), recorded once
      in each tracker with `lm.utils.code_version()`.
    wandb_project, wandb_entity: where the W&B run goes ("" = W&B's default entity).
    """

    def __init__(
        self,
        workdir: storage.PathLike,
        start: int | None = None,
        *,
        loggers: tuple[str, ...] | str = ("tensorboard",),
        record: dict | None = None,
        wandb_project: str = "lm",
        wandb_entity: str = "",
    ):
        names = parse_loggers(loggers if isinstance(loggers, str) else ",".join(loggers))
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = storage.as_path(workdir)
        if start is not None:
            _drop_rows_after(workdir, start)
        self.jsonl = storage.LineLog(workdir / METRICS_FILE)
        if self.jsonl.dropped is not None:
            logging.warning(
                "%s ended in a partly written line (the run was killed while writing it): "
                "dropped %r",
                self.jsonl.path,
                self.jsonl.dropped[:80],
            )
        code = code_version() if names else None
        opens = {
            "tensorboard": lambda: _TensorBoard(workdir, record, code, start or 0),
            "wandb": lambda: _WandB(workdir, record, code, wandb_project, wandb_entity),
        }
        self.trackers = [opens[name]() for name in names]

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Appends the row to metrics.jsonl and logs it to every tracker at `step`."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}))
        for tracker in self.trackers:
            tracker.write(step, metrics)

    def close(self) -> None:
        """Closes metrics.jsonl and finishes every tracker (a W&B run is marked finished)."""
        if self.enabled:
            self.jsonl.close()
            for tracker in self.trackers:
                tracker.close()
