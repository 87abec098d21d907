"""The experiment trackers of `MetricWriter` (lm.train.metrics), read back from their own files:
TensorBoard's event file and an offline W&B run's .wandb file; `train.loggers`' validation;
`lm.utils.code_version`."""

import importlib.metadata
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import lm
import pytest
from lm.train import MetricWriter, TrainConfig
from lm.utils import code_version

RECORD = {"train": {"steps": 4, "loggers": "tensorboard,wandb"}, "model": {"d_model": 8}}
ROWS = [(1, {"loss": 2.5, "eval/loss": 2.75}), (2, {"loss": 2.25}), (3, {"loss": 2.0})]


def _tfrecords(path) -> list[bytes]:
    """The records of a TFRecord file (TensorBoard's event files), checksums checked: each is
    a u64 length, its masked CRC-32C, the data, the data's masked CRC-32C."""
    from tensorboardX.record_writer import masked_crc32c

    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos : pos + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack_from("<I", data, pos + 8)[0] == masked_crc32c(header)
        body = data[pos + 12 : pos + 12 + n]
        assert struct.unpack_from("<I", data, pos + 12 + n)[0] == masked_crc32c(body)
        out.append(body)
        pos += 16 + n
    return out


def _tensorboard_events(logdir) -> list:
    from tensorboardX.proto.event_pb2 import Event

    (path,) = logdir.glob("events.out.tfevents.*")
    return [Event.FromString(record) for record in _tfrecords(path)]


def test_tensorboard_gets_the_record_and_code_version_as_text_and_every_scalar(tmp_path):
    writer = MetricWriter(tmp_path, 0, loggers=("tensorboard",), record=RECORD)
    for step, metrics in ROWS:
        writer.write(step, metrics)
    writer.close()

    events = _tensorboard_events(tmp_path / "tensorboard")
    values = [(e.step, v) for e in events for v in e.summary.value]
    scalars = [(s, v.tag, v.simple_value) for s, v in values if v.HasField("simple_value")]
    assert scalars == [(s, k, x) for s, m in ROWS for k, x in m.items()]  # exact in float32
    texts = {v.tag: v.tensor.string_val[0].decode() for _, v in values if v.HasField("tensor")}
    assert json.loads(textwrap.dedent(texts["config/text_summary"])) == RECORD
    assert json.loads(textwrap.dedent(texts["code/text_summary"])) == code_version()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": s, **m} for s, m in ROWS
    ]


def test_no_loggers_writes_metrics_jsonl_only(tmp_path):
    writer = MetricWriter(tmp_path, loggers=TrainConfig(loggers="").logger_names)
    writer.write(1, {"loss": 2.5})
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# An offline run's .wandb file is a LevelDB-style log of wandb_internal_pb2.Record protobufs:
# a 7-byte header (":W&B", 0xBEE1, version 0), then 32 KiB blocks of chunks, each a CRC-32
# (zlib's, over the chunk type and data), a u16 length, a u8 type (full, first, middle,
# last). wandb 0.31 ships no reader for it (the Python DataStore of older versions is gone).
_WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK, _FULL, _FIRST, _MIDDLE, _LAST = 32768, 1, 2, 3, 4


def _wandb_records(path) -> list:
    """The Records of a .wandb file, in order, checksums checked."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data.startswith(_WANDB_HEADER), data[:7]
    pos, parts, out = len(_WANDB_HEADER), b"", []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, n, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7 : pos + 7 + n]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad chunk at byte {pos}"
        pos += 7 + n
        parts = chunk if kind in (_FULL, _FIRST) else parts + chunk
        if kind in (_FULL, _LAST):
            out.append(Record.FromString(parts))
    return out


def _wandb_run(path) -> dict:
    """An offline run's id, project, config, metric definitions and history rows (W&B's own
    keys, such as _step and _runtime, left out) from its .wandb file."""
    records = _wandb_records(path)
    (run,) = [r.run for r in records if r.HasField("run")]
    config = {c.key: json.loads(c.value_json) for c in run.config.update if c.key != "_wandb"}
    history = [
        {
            "/".join(item.nested_key) or item.key: json.loads(item.value_json)
            for item in r.history.item
            if not (item.nested_key or [item.key])[0].startswith("_")
        }
        for r in records
        if r.HasField("history")
    ]
    metrics = {
        (m.metric.glob_name or m.metric.name): m.metric.step_metric
        for m in records
        if m.HasField("metric")
    }
    return {
        "id": run.run_id,
        "project": run.project,
        "config": config,
        "history": history,
        "metrics": metrics,
    }


def test_a_wandb_offline_run_holds_the_rows_record_and_code_version_and_a_resume_continues_it(
    tmp_path, monkeypatch
):
    wandb = pytest.importorskip("wandb")  # the [wandb] extra
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # a local workdir wins
    workdir = tmp_path / "run"
    workdir.mkdir()

    def run_files() -> set:
        # run.finish() only tells W&B's service process that the run is done: the service
        # closes the .wandb file after finish() returns (a read then, on a busy machine, found
        # the header alone). wandb.teardown() waits for the service to finish and exit.
        wandb.teardown()
        return set((workdir / "wandb").glob("offline-run-*/run-*.wandb"))

    writer = MetricWriter(workdir, 0, loggers=("wandb",), record=RECORD, wandb_project="lm-test")
    for step, metrics in ROWS:
        writer.write(step, metrics)
    writer.close()
    (first_file,) = run_files()
    first = _wandb_run(first_file)
    assert first["project"] == "lm-test"
    assert first["config"] == {**RECORD, "code": code_version()}
    assert first["history"] == [{"step": s, **m} for s, m in ROWS]
    assert first["metrics"]["*"] == "step"  # our step is every chart's x-axis
    assert (workdir / "wandb_run_id").read_text() == first["id"] + "\n"
    assert not (tmp_path / "elsewhere").exists()

    # Resumed from step 2: the killed run's step 3 is logged again, then step 4.
    writer = MetricWriter(workdir, 2, loggers=("wandb",), record=RECORD, wandb_project="lm-test")
    writer.write(3, {"loss": 2.0})
    writer.write(4, {"loss": 1.75})
    writer.close()
    (second_file,) = run_files() - {first_file}
    second = _wandb_run(second_file)
    assert second["id"] == first["id"]
    assert second["history"] == [{"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.75}]


def test_wandb_missing_is_an_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"'):
        MetricWriter(tmp_path, loggers=("wandb",))


def test_an_unknown_logger_is_a_one_line_error_naming_the_known_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        TrainConfig.from_dict({"loggers": "tensorboard,mlflow"})
    message = str(error.value)
    assert "\n" not in message and "'mlflow'" in message
    assert "'tensorboard'" in message and "'wandb'" in message
    with pytest.raises(ValueError, match="'tb'"):
        MetricWriter(tmp_path, loggers=("tb",))
    assert TrainConfig(loggers=" wandb, tensorboard,wandb").logger_names == ("wandb", "tensorboard")
    assert TrainConfig().logger_names == ("tensorboard",)


def test_a_resume_may_change_the_trackers():
    from lm import history

    saved = {"train": {"steps": 4}}  # a run from before train.loggers existed
    values = {"train": {"steps": 4, "loggers": "wandb", "wandb_project": "p", "wandb_entity": "e"}}
    free, accepted = history.check_resume(saved, {}, values, {}, step=2)
    assert set(free) == {"train.loggers", "train.wandb_project", "train.wandb_entity"}
    assert accepted == {}


def test_code_version_is_the_checkouts_head_commit():
    package = os.path.dirname(lm.__file__)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, check=True
    ).stdout.strip()
    version = code_version()
    assert version["commit"] == head
    assert isinstance(version["dirty"], bool)
    assert version["version"] == importlib.metadata.version("lm")


def test_code_version_without_git_is_the_installed_version(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary to be found
    assert code_version() == {
        "commit": None,
        "dirty": None,
        "version": importlib.metadata.version("lm"),
    }


def test_the_training_loop_logs_to_wandb_what_metrics_jsonl_holds(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # the [wandb] extra
    from lm.train import IndexedBatches, TrainConfig, read_metrics, train_loop

    from tests.hang_run import blocking_batch_source
    from tests.test_monitor import tiny_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = TrainConfig(
        steps=4, log_every=2, checkpoint_every=100, progress=False, loggers="tensorboard,wandb"
    )
    batches = IndexedBatches(blocking_batch_source)
    train_loop(tiny_trainer(), config, tmp_path, batches, record=RECORD)
    wandb.teardown()  # waits for W&B's service to close the run's file
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    run = _wandb_run(path)
    assert run["history"] == read_metrics(tmp_path) and [r["step"] for r in run["history"]] == [
        2,
        4,
    ]
    assert run["config"] == {**RECORD, "code": code_version()}
