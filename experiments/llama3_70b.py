r"""Llama 3 70B pretraining on C4 (English), for a TPU v5p-128 slice (v5p:4x4x8, 128 chips).

Check that it fits before booking the slice (any machine, libtpu from the `[tpu]` extra):

    python -m lm.main compile --config experiments/llama3_70b.py --topology v5p:4x4x8

Train on the slice (every host runs it; see launch/tpu_pod.py):

    python -m lm.main --config experiments/llama3_70b.py --workdir gs://BUCKET/llama3_70b

Shape of Llama 3 70B (Grattafiori et al. 2024): d_model 8,192, 80 layers, 64 query heads
sharing 8 key/value heads of 128, SwiGLU MLP 28,672, vocabulary 128,256, RoPE base 500,000,
untied embeddings: 70.6B parameters. One row of 8,192 tokens per chip (a global batch of
128 x 8,192 = 1M tokens), bf16 compute over float32 parameters and Adam moments sharded
128 ways (FSDP), remat full, logits made 1,024 positions at a time.

Compiled from the 2-core CPU dev machine (2026-12-06, jax 0.10.2, libtpu 0.0.42.1), one
row of 8,192 per chip (--config.data.batch_size = chips), splash attention, GiB per chip:
state + temporaries of the train step, of 95.74 GiB HBM:

    topology          batch         GiB per chip            step at peak  MFU ceiling  compile
    v5p:4x4x8 (128)   128 x 8,192   29.97 (6.16 + 23.73)    11.6 s        75%          166 s
    v5p:4x4x4 (64)    64 x 8,192    40.88 (12.32 + 28.48)   11.6 s        75%          185 s
    v5p:2x4x4 (32)    32 x 8,192    63.04 (24.64 + 38.36)   11.6 s        75%          142 s
    v5p:2x2x4 (16)    16 x 8,192    does not fit: 102.03 (49.28 + 52.70)
    v5p:2x2x2 (8)     8 x 8,192     does not fit: the compiler needs 159.94

So the smallest v5p slice it fits is v5p-32 (the float32 state alone is 789 GiB). No TPU
has run it: step times are the ceilings at the chips' 459 TFLOP/s.

Args: 'tiny' (a few-million-parameter model of the same family, for tests).
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    config = experiment(
        preset="llama",
        model=dict(
            d_model=8192,
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            mlp_dim=28_672,
            rope_base=500_000.0,
            tied_embeddings=False,
            vocab_size=128_256,
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
            batch_size=128,
            vocab_size=128_256,
        ),
        optimizer=dict(
            name="adamw", learning_rate=1.5e-4, warmup_steps=2000, weight_decay=0.1, clip_norm=1.0
        ),
        train=dict(steps=100_000, log_every=10, eval_every=1000, checkpoint_every=500),
        parallel=dict(mesh=(1, -1, 1)),
    )
    if "tiny" in args:
        config.model.update(
            d_model=64, num_layers=2, num_heads=8, num_kv_heads=2, mlp_dim=128, vocab_size=1024
        )
        config.model.update(logits_chunk=64, max_len=256)
        config.data.update(seq_len=256, batch_size=8, vocab_size=1024)
    return config
