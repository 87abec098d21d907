r"""Llama 3 8B pretraining on C4 (English), for a TPU v5p-64 slice (v5p:4x4x4, 64 chips).

Check that it fits before booking the slice (any machine, libtpu from the `[tpu]` extra):

    python -m lm.main compile --config experiments/llama3_8b.py --topology v5p:4x4x4

Train on the slice (every host runs it; see launch/tpu_pod.py):

    python -m lm.main --config experiments/llama3_8b.py --workdir gs://BUCKET/llama3_8b

Shape of Llama 3 8B (Grattafiori et al. 2024): d_model 4,096, 32 layers, 32 query heads
sharing 8 key/value heads of 128, SwiGLU MLP 14,336, vocabulary 128,256, RoPE base 500,000,
untied embeddings: 8.03B parameters. 2 rows of 8,192 tokens per chip (a global batch of
128 x 8,192 = 1M tokens), bf16 compute over float32 parameters and Adam moments, all sharded
64 ways (FSDP), each layer's input kept for the backward pass (remat full), logits made
1,024 positions at a time. The tokenizer is a SentencePiece model of the same vocabulary
trained on C4's training split (or set data.tokenizer to one you have).

Args (comma-separated): 'short' (2,048 positions per row, one row per chip: the issue's
first measurement), 'tiny' (a few-million-parameter model of the same family, for tests).

Compiled from the 2-core CPU dev machine (2026-12-06, jax 0.10.2, libtpu 0.0.42.1; the
command above, GiB per chip: state + temporaries of the train step, of 95.74 GiB HBM):

    topology          batch         attention  GiB per chip          step at peak  MFU ceiling  compile
    v5p:4x4x4 (64)    128 x 8,192   splash     13.01 (1.40 + 11.54)  2.94 s        74%          91 s
    v5p:4x4x4 (64)    512 x 8,192   splash     41.67 (1.40 + 40.19)  11.8 s        74%          91 s
    v5p:4x4x4 (64)    128 x 8,192   xla        48.78 (1.40 + 47.30)  2.94 s        74%          191 s
    v5p:4x4x4 (64)    64 x 2,048    splash     9.74 (1.40 + 8.27)    0.31 s        74%          142 s
    v5p:2x4x4 (32)    128 x 8,192   splash     26.91 (2.81 + 24.07)  5.89 s        74%          120 s

(512 x 8,192: --config.data.batch_size=512; xla: --config.model.attention_impl=xla; the
2,048 row is the 'short' arg.) No TPU has run it: step times are the ceilings at the
chips' 459 TFLOP/s, not measurements.
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "short", "tiny")
    config = experiment(
        preset="llama",
        model=dict(
            d_model=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=14_336,
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
            name="adamw", learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1, clip_norm=1.0
        ),
        train=dict(steps=100_000, log_every=10, eval_every=1000, checkpoint_every=500),
        parallel=dict(mesh=(1, -1, 1)),
    )
    if "short" in args:
        config.data.update(seq_len=2048, batch_size=64)
    if "tiny" in args:
        config.model.update(
            d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, vocab_size=1024
        )
        config.data.update(seq_len=256, batch_size=8, vocab_size=1024)
        config.model.update(logits_chunk=64, max_len=256)
    return config
