r"""Mixtral 8x7B pretraining on C4 (English), for a TPU v5p-16 slice (v5p:2x2x4, 16 chips).

Check that it fits before booking the slice (any machine, libtpu from the `[tpu]` extra):

    python -m lm.main compile --config experiments/mixtral_8x7b.py --topology v5p:2x2x4

Train on the slice (every host runs it; see launch/tpu_pod.py):

    python -m lm.main --config experiments/mixtral_8x7b.py --workdir gs://BUCKET/mixtral_8x7b

Shape of Mixtral 8x7B (Jiang et al. 2024; the `mixtral` preset): d_model 4,096, 32 layers,
32 query heads sharing 8 key/value heads of 128, each MLP replaced by 8 SwiGLU experts of
width 14,336 with every token routed to its top 2 (gates renormalised, load-balancing loss
0.02), vocabulary 32,000, RoPE base 1,000,000, untied embeddings: 46.7B parameters, 12.9B
active per token. Dropless dispatch (`model.moe_dispatch`: each expert multiplies only its
own tokens, none dropped; on TPU the grouped matmul is `jax.lax.ragged_dot`, a Mosaic
grouped kernel, which `model.moe_grouped_matmul=auto` picks by the platform the step is
traced for, so also when compiling for a slice from a CPU host). One row of 8,192 tokens
per chip (a global batch of 16 x 8,192 = 131k tokens), bf16 compute over float32
parameters and Adam moments sharded over every chip (FSDP: the expert kernels' expert axis
would take the fsdp mesh axis, `lm.parallel.DEFAULT_RULES`, but 8 experts do not divide 16
chips, so their embed axis takes it), remat full, logits made 1,024 positions at a time.
The tokenizer is a SentencePiece model of the same vocabulary trained on C4's training
split (or set data.tokenizer to one you have).

Compiled from the 2-core CPU dev machine (2026-12-07, commit e226586: the sorted dispatch
runs per device, jax 0.10.2, libtpu 0.0.42.1), one row of 8,192 per chip
(--config.data.batch_size = chips) but the last row, GiB per chip: state + temporaries of the
train step, of 95.74 GiB HBM:

    topology         batch          GiB per chip           step at peak  MFU ceiling  compile
    v5p:2x2x2 (8)    8 x 8,192      does not fit: the compiler needs 116.29
    v5p:2x2x4 (16)   16 x 8,192     68.82 (32.62 + 36.15)  2.15 s        75%          234 s
    v5p:2x4x4 (32)   32 x 8,192     39.11 (16.31 + 22.75)  2.15 s        75%          151 s
    v5p:4x4x4 (64)   64 x 8,192     25.72 (8.16 + 17.49)   2.15 s        75%          234 s
    v5p:4x4x8 (128)  128 x 8,192    18.48 (4.08 + 14.33)   2.15 s        75%          179 s
    v5p:4x4x4 (64)   128 x 8,192    32.13 (8.16 + 23.89)   4.30 s        75%          221 s

So the smallest v5p slice it fits is v5p-16 (the float32 state alone is 522 GiB: 65 GiB a
chip on v5p-8); 1M tokens a step (--config.data.batch_size=128) fit a v5p-64. The compile
times are of a machine shared with other jobs (the same compile varied 2-3x between runs).
Before commit e226586 the dispatch's sort ran over the global batch on every chip: v5p-16
needed 93.41 GiB, v5p-32 91.30, and v5p-64 and v5p-128 did not fit (127.63 and 234.00). No
TPU has run it: step times are the ceilings at the chips' 459 TFLOP/s (6 x the 12.9B active
parameters + attention per token, and remat's recompute), not measurements.

Args: 'tiny' (a 354k-parameter mixture of the same family, for tests).
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    config = experiment(
        preset="mixtral",
        model=dict(
            moe_dispatch="dropless",
            max_len=8192,
            precision="bf16",
            remat="full",
            logits_chunk=1024,
        ),
        data=dict(
            source="tfds:c4/en",
            text_key="text",
            task="lm",
            seq_len=8192,
            batch_size=16,
            vocab_size=32_000,
        ),
        optimizer=dict(
            name="adamw", learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1, clip_norm=1.0
        ),
        train=dict(steps=100_000, log_every=10, eval_every=1000, checkpoint_every=500),
        parallel=dict(mesh=(1, -1, 1)),
    )
    if "tiny" in args:
        config.model.update(
            d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, vocab_size=1024
        )
        config.model.update(logits_chunk=64, max_len=256)
        config.data.update(seq_len=256, batch_size=8, vocab_size=1024)
    return config
