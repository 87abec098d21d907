r"""A small Llama-family model (RoPE, RMSNorm, SwiGLU, grouped-query attention) on Shakespeare.

Command (2-core CPU):

    python -m lm.main --config experiments/shakespeare_llama.py --workdir workdirs/shakespeare_llama

Same data, tokenizer and budget as shakespeare_gpt; 4 query heads sharing 2 key/value heads.

Measured on the 2-core CPU dev machine (2026-12-07, rows packed by `lm.data.packing`), 4.00M
parameters, 480 steps of 16 x 256 tokens, a median 4,100 tokens/s:

    step   train loss   validation loss   perplexity   bits/byte
     160      4.48           4.596            99.1        2.327
     320      4.19           4.287            72.8        2.171
     480      3.91           4.159            64.0        2.106

    wall time: 8 min 36 s; unigram baseline 6.063 nats/token (GPT-2 family: 4.529)
Arg: 'tiny' gives a seconds-long smoke run (used by the tests).
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    config = experiment(
        preset="llama",
        model=dict(
            d_model=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            mlp_dim=704,
            rope_base=10_000.0,
            max_len=256,
        ),
        data=dict(source="shakespeare", task="lm", seq_len=256, batch_size=16, vocab_size=4096),
        optimizer=dict(name="adamw", learning_rate=2e-3, warmup_steps=50),
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
        config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
        config.data.update(seq_len=64, batch_size=8, vocab_size=512)
        config.optimizer.update(warmup_steps=5)
        config.train.update(
            steps=20, log_every=5, eval_every=10, checkpoint_every=10, sample_tokens=16
        )
    return config
