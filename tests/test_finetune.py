"""Fine-tuning through the CLI: train.init_from another workdir, LoRA, and resuming a fine-tune."""

import json
import shutil

import jax
import numpy as np
import pytest
from lm import checkpoint, finetune, run

from tests.test_main import TINY, metrics, run_cli, snapshot, write_corpus


def params_of(workdir):
    """The parameters of a workdir's latest checkpoint, as sample, eval and init_from read them."""
    return checkpoint.read_model(workdir).params


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 20-step tiny run: the model that the tests below fine-tune."""
    root = tmp_path_factory.mktemp("finetune")
    corpus = write_corpus(root / "corpus")
    workdir = root / "source"
    run_cli(TINY, "--config.train.steps=20", workdir=workdir, source=corpus, data_dir=root / "data")
    return root, corpus, workdir


def test_a_workdir_read_for_inference_gives_the_runs_own_evaluation(source):
    """read_model reads the latest checkpoint's parameters (no optimizer, nothing compiled), and
    the loss over them without a trainer is the one the run logged at that step."""
    _, _, src = source
    saved = checkpoint.read_model(src)
    assert saved.step == 20 and saved.source == str(src) and saved.imported is None
    assert saved.sections == json.loads((src / "config.json").read_text())
    assert saved.config.vocab_size == saved.sections["model"]["vocab_size"]
    last = metrics(src)[-1]
    assert last["step"] == 20
    loss = run.split_loss(saved, "validation")
    np.testing.assert_allclose(loss["loss"], last["eval/loss"], rtol=1e-5)
    np.testing.assert_allclose(loss["bits_per_byte"], last["eval/bits_per_byte"], rtol=1e-5)
    np.testing.assert_allclose(loss["accuracy"], last["eval/accuracy"], rtol=1e-5)


@pytest.mark.slow
def test_init_from_starts_from_the_source_parameters(source, tmp_path):
    """With a zero learning rate the fine-tune keeps its starting point: the source's exact parameters."""
    root, corpus, src = source
    before = snapshot(src)
    workdir = tmp_path / "b"
    run_cli(
        TINY,
        f"--config.train.init_from={src}",
        "--config.optimizer.learning_rate=0",
        "--config.train.steps=2",
        "--config.train.eval_every=2",
        workdir=workdir,
        source=corpus,
        data_dir=root / "data",
    )
    assert (workdir / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    jax.tree.map(np.testing.assert_array_equal, params_of(workdir), params_of(src))
    assert metrics(workdir)[-1]["eval/loss"] == metrics(src)[-1]["eval/loss"]
    assert [m["step"] for m in metrics(workdir)] == [2]  # its own step count, from 0
    assert snapshot(src) == before  # the source is only read


def test_fine_tune_learns_and_resumes_from_its_own_checkpoint(source, tmp_path):
    """5 steps, stop, rerun to 10: the rerun continues the fine-tune's own checkpoint (the source is
    gone by then). That a resume is exact is proven in test_main and test_lora."""
    root, corpus, src = source
    copy = tmp_path / "source"
    shutil.copytree(src, copy)
    flags = (
        TINY,
        f"--config.train.init_from={copy}",
        "--config.optimizer.decay_steps=10",
        "--config.train.log_every=1",
    )
    kwargs = dict(workdir=tmp_path / "b", source=corpus, data_dir=root / "data")
    run_cli(*flags, "--config.train.steps=5", **kwargs)
    first = params_of(tmp_path / "b")
    shutil.rmtree(copy)  # resuming must need nothing but the fine-tune's own checkpoint
    proc = run_cli(*flags, "--config.train.steps=10", **kwargs)
    assert "ignored" in proc.stderr
    lines = metrics(tmp_path / "b")
    assert [m["step"] for m in lines] == list(range(1, 11))
    # It kept learning from where the source stopped ...
    evals = [m["eval/loss"] for m in lines if "eval/loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0] < metrics(src)[-1]["eval/loss"]
    # ... and the second half moved on from the first half's parameters.
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params_of(tmp_path / "b"), first)
    assert all(jax.tree.leaves(changed))


def test_init_from_a_model_of_another_shape_is_a_clear_error(source, tmp_path):
    root, corpus, src = source
    proc = run_cli(
        TINY,
        f"--config.train.init_from={src}",
        "--config.model.d_model=64",
        workdir=tmp_path / "b",
        source=corpus,
        data_dir=root / "data",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "init_from" in proc.stderr and "model.d_model: source 32, now 64" in proc.stderr
    assert "config.json" in proc.stderr  # where the source's values are
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_bad_init_from_specs_are_clear_errors(source, tmp_path):
    _, _, src = source
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text((src / "config.json").read_text())
    for spec, expected in [
        (str(tmp_path / "missing"), "no such workdir"),
        (str(tmp_path), "no config.json"),
        (str(tmp_path / "fresh"), "no checkpoint yet"),
        ("gguf:smollm2", "GGUF file smollm2 does not exist"),
        ("hf:/models/llama", "/models/llama"),
        ("nonsense:thing", "no such workdir"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=expected):
            finetune.init_source(spec)
    assert (
        finetune.init_source(str(src)).model
        == json.loads((src / "config.json").read_text())["model"]
    )


@pytest.mark.slow
def test_lora_through_the_cli(source, tmp_path):
    root, corpus, src = source
    workdir = tmp_path / "lora"
    kwargs = dict(workdir=workdir, data_dir=root / "data")
    proc = run_cli(
        TINY,
        f"--config.train.init_from={src}",
        "--config.train.lora_rank=4",
        "--config.optimizer.learning_rate=1e-2",
        "--config.train.steps=10",
        source=corpus,
        **kwargs,
    )
    # 2 layers x rank 4 x (query, key, value, out: 32 + 32 each; wi: 32 + 64; wo: 64 + 32)
    assert f"{2 * 4 * (4 * 64 + 96 + 96):,} trainable of" in proc.stdout
    lines = metrics(workdir)
    assert lines[-1]["eval/loss"] < metrics(src)[-1]["eval/loss"]  # the adapters learnt something
    # eval and sample restore base + adapters and run the merged model.
    out = run_cli("eval", source=None, **kwargs).stdout
    result = json.loads(out[out.index("{") :])
    assert result["step"] == 10 and result["loss"] == lines[-1]["eval/loss"]
    sample = run_cli("sample", "--prompt=The king", "--max_new_tokens=8", source=None, **kwargs)
    assert sample.stdout.startswith("The king")
    # Its checkpoints hold rank-4 adapters: another rank on resume is refused, not half-loaded.
    again = run_cli(
        TINY,
        "--config.train.lora_rank=8",
        "--config.train.steps=12",
        source=corpus,
        check=False,
        **kwargs,
    )
    assert again.returncode == 2 and "train.lora_rank: saved 4, now 8" in again.stderr


def test_misspelt_lora_target_is_a_clear_error(tmp_path):
    proc = run_cli(
        TINY,
        "--config.train.lora_rank=4",
        "--config.train.lora_targets=qeury,value",
        workdir=tmp_path / "run",
        source=None,
        data_dir=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "qeury" in proc.stderr and "wi_gate" in proc.stderr
    assert not (tmp_path / "run").exists()


SMOLLM2_RANK8_ADAPTERS = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "tiny,lora"])
def test_fine_tuning_imported_smollm2_lowers_held_out_loss(tmp_path, variant):
    """init_from='smollm2': the GGUF import, its tokenizer adopted, held-out loss falls; LoRA
    trains exactly the rank-8 adapters of the 30 layers' projections."""
    from lm.data import assets

    corpus = write_corpus(tmp_path / "corpus")
    workdir = tmp_path / "ft"
    proc = run_cli(
        f"--config=experiments/smollm2_shakespeare.py:{variant}",
        workdir=workdir,
        source=corpus,
        data_dir=tmp_path / "data",
        vocab="--config.data.vocab_size=320",
        cache_dir=assets.cache_dir(),
        timeout=900,
    )
    assert (workdir / "tokenizer.json").exists() and not (workdir / "tokenizer.model").exists()
    evals = [m["eval/loss"] for m in metrics(workdir) if "eval/loss" in m]
    assert [m["step"] for m in metrics(workdir) if "eval/loss" in m] == [0, 3]
    assert evals[-1] < evals[0], evals
    if "lora" in variant:
        assert f"{SMOLLM2_RANK8_ADAPTERS:,} trainable of" in proc.stdout
    else:
        assert "134,515,008 parameters, all trainable" in proc.stdout


@pytest.mark.slow
def test_span_corruption_pretraining_fine_tunes_onto_translation(tmp_path):
    """Encoder-decoder: span corruption on a text corpus, then translation (real bible pairs)
    from those parameters and that tokenizer; the held-out translation loss falls."""
    from lm.data import assets

    corpus = write_corpus(tmp_path / "corpus")
    common = dict(data_dir=tmp_path / "data", cache_dir=assets.cache_dir(), timeout=900)
    pretrain = tmp_path / "span"
    run_cli(
        "--config=experiments/t5_span_corruption.py:tiny",
        workdir=pretrain,
        source=corpus,
        vocab="--config.data.vocab_size=440",
        **common,
    )
    workdir = tmp_path / "en_fr"
    run_cli(
        "--config=experiments/t5_translation_finetune.py:tiny",
        f"--config.train.init_from={pretrain}",
        workdir=workdir,
        source=None,
        **common,
    )
    assert (workdir / "tokenizer.model").read_bytes() == (pretrain / "tokenizer.model").read_bytes()
    evals = [(m["step"], m["eval/loss"]) for m in metrics(workdir) if "eval/loss" in m]
    assert [s for s, _ in evals] == [0, 10] and evals[1][1] < evals[0][1], evals
