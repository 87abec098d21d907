"""The encoder-decoder trains on translation pairs (through the real data path) and span corruption."""

import jax
import numpy as np
import pytest
from lm import parallel
from lm.data import assets, pipeline
from lm.models import transformer as T
from lm.train import OptimizerConfig, create_trainer

from tests.test_data_bible import make_db

EN_FR = {
    "the": "le",
    "king": "roi",
    "man": "homme",
    "sees": "voit",
    "eats": "mange",
    "bread": "pain",
    "house": "maison",
    "good": "bon",
    "big": "grand",
    "dog": "chien",
    "loves": "aime",
    "God": "Dieu",
}


def synthetic_bible(path, verses=400, seed=0):
    rng = np.random.default_rng(seed)
    words = list(EN_FR)
    table = {}
    for i in range(verses):
        english = " ".join(rng.choice(words, size=rng.integers(3, 7)))
        french = " ".join(EN_FR[w] for w in english.split())
        # Ruth (8) is a validation book and Joel (29) a test book.
        book = 1 if i < verses - 80 else (8 if i < verses - 40 else 29)
        table[(book, 1 + i // 50, 1 + i % 50)] = (english + ".", french + ".")
    return make_db(path, verses=table, extra_versions=())


def train_losses(cfg, tmp_path, model_config, steps, lr=3e-3):
    tokenizer = pipeline.get_tokenizer(cfg, str(tmp_path / "work"))
    model_config = T.ModelConfig(**{**model_config.__dict__, "vocab_size": tokenizer.vocab_size})
    trainer = create_trainer(
        model_config,
        T.build_model(model_config),
        OptimizerConfig(learning_rate=lr, warmup_steps=5),
        steps,
        parallel.ParallelConfig(),
        devices=jax.devices()[:1],
    )
    state = trainer.init_fn(0)
    data = iter(pipeline.make_dataset(cfg, "train", tokenizer, seed=0, prefetch=False))
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, trainer.put_batch(next(data)))
        losses.append(float(metrics["loss"]))
    valid = trainer.evaluate(
        state,
        iter(
            pipeline.make_dataset(
                cfg, "validation", tokenizer, seed=0, repeat=False, prefetch=False
            )
        ),
    )
    return losses, valid


def test_encoder_decoder_learns_translation_pairs(tmp_path, monkeypatch):
    db = synthetic_bible(tmp_path / "bible.db")
    monkeypatch.setattr(assets, "fetch", lambda name: db)
    cfg = pipeline.DataConfig(
        source="bible:4-l",
        task="translation",
        seq_len=16,
        encoder_len=16,
        batch_size=16,
        vocab_size=300,
        data_dir=str(tmp_path / "tfds"),
    )
    model = T.preset("transformer_base", **{**T.TINY, "d_model": 64, "mlp_dim": 128}, dropout=0.0)
    losses, valid = train_losses(cfg, tmp_path, model, steps=120, lr=3e-3)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    # Held-out books: the word-for-word mapping generalises.
    assert valid["loss"] < 0.6 * losses[0] and valid["tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["t5"])
def test_span_corruption_pretraining_loss_falls(tmp_path, preset):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for f in range(3):
        lines = [" ".join(rng.choice(list(EN_FR), size=8)) + "." for _ in range(300)]
        (corpus / f"{f}.txt").write_text("\n".join(lines))
    cfg = pipeline.DataConfig(
        source=f"text:{corpus}/*.txt",
        task="span_corruption",
        seq_len=16,
        encoder_len=48,
        batch_size=16,
        vocab_size=400,
        data_dir=str(tmp_path / "tfds"),
    )
    model = T.preset(preset, **T.TINY, head_dim=8)
    losses, _ = train_losses(cfg, tmp_path, model, steps=40)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
