r"""T5-style encoder-decoder pretraining with span corruption on the Shakespeare corpus.

Command:

    python -m lm.main --config experiments/t5_span_corruption.py --workdir workdirs/t5_span

15% of tokens are masked in spans of mean length 3 and replaced by sentinels
(`<extra_id_i>`, reserved in the tokenizer); the decoder predicts the dropped spans.
Any text source works: --config.data.source=text:/path/*.txt or tfds:NAME.
Arg: 'tiny' gives a short smoke run.
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    config = experiment(
        preset="t5",
        model=dict(d_model=256, num_layers=3, num_heads=4, head_dim=64, mlp_dim=704),
        data=dict(
            source="shakespeare",
            task="span_corruption",
            encoder_len=256,
            seq_len=64,
            batch_size=16,
            vocab_size=4096,
            noise_density=0.15,
            mean_noise_span_length=3.0,
        ),
        optimizer=dict(name="adafactor", learning_rate=1e-2, warmup_steps=100, weight_decay=0.0),
        train=dict(
            steps=1000, log_every=50, eval_every=250, checkpoint_every=250, sample_tokens=32
        ),
    )
    if "tiny" in args:
        config.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
        config.data.update(encoder_len=64, seq_len=24, batch_size=8, vocab_size=512)
        config.optimizer.update(warmup_steps=5)
        config.train.update(
            steps=20, log_every=5, eval_every=10, checkpoint_every=10, sample_tokens=8
        )
    return config
