"""Where the loop writes metrics: TensorBoard event files (local or on an object store) and
`metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging

import jax

from lm import storage


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


class MetricWriter:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard events, process 0 only.
    start: the step a training run starts from; rows after it are dropped
    (`_drop_rows_after`). None keeps every row."""

    def __init__(self, workdir: storage.PathLike, start: int | None = None):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        _register_store_writers()
        if start is not None:
            _drop_rows_after(workdir, start)
        self.jsonl = storage.LineLog(storage.as_path(workdir) / METRICS_FILE)
        if self.jsonl.dropped is not None:
            logging.warning(
                "%s ended in a partly written line (the run was killed while writing it): "
                "dropped %r",
                self.jsonl.path,
                self.jsonl.dropped[:80],
            )
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}))
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
