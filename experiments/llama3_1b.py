r"""Llama 3.2 1B pretraining on C4 (English), for a TPU v5e-16 slice (v5e:4x4, 16 chips).

Check that it fits before booking the slice (any machine, libtpu from the `[tpu]` extra):

    python -m lm.main compile --config experiments/llama3_1b.py --topology v5e:4x4
    python -m lm.main compile --config experiments/llama3_1b.py --topology v6e:4x4

Train on the slice (every host runs it; see launch/tpu_pod.py):

    python -m lm.main --config experiments/llama3_1b.py --workdir gs://BUCKET/llama3_1b

Shape of Llama 3.2 1B (Meta 2024): d_model 2,048, 16 layers, 32 query heads sharing 8
key/value heads of 64, SwiGLU MLP 8,192, vocabulary 128,256, RoPE base 500,000, tied
embeddings: 1.24B parameters. 4 rows of 8,192 tokens per chip (a global batch of
64 x 8,192 = 0.5M tokens), bf16 compute over float32 parameters and Adam moments sharded
16 ways (FSDP), remat full, logits made 1,024 positions at a time.

Args: 'tiny' (a model of the same family with a few million parameters, for tests).

Compiled from the 2-core CPU dev machine (2026-12-06, jax 0.10.2, libtpu 0.0.42.1), 4 rows
of 8,192 per chip, splash attention, GiB per chip: state + temporaries of the train step:

    topology        batch        GiB per chip          HBM    step at peak  MFU ceiling  compile
    v5e:4x4 (16)    64 x 8,192   10.94 (0.86 + 10.04)  16.00  2.45 s        72%          106 s
    v5e:2x4 (8)     32 x 8,192   12.33 (1.73 + 10.57)  16.00  2.45 s        72%          144 s
    v6e:4x4 (16)    64 x 8,192   9.78 (0.86 + 8.88)    32.00  0.53 s        72%          163 s

No TPU has run it: step times are the ceilings at the chips' bf16 peaks (197, 918 TFLOP/s).
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    config = experiment(
        preset="llama",
        model=dict(
            d_model=2048,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            mlp_dim=8192,
            rope_base=500_000.0,
            tied_embeddings=True,
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
            batch_size=64,
            vocab_size=128_256,
        ),
        optimizer=dict(
            name="adamw", learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1, clip_norm=1.0
        ),
        train=dict(steps=100_000, log_every=10, eval_every=1000, checkpoint_every=500),
        parallel=dict(mesh=(1, -1, 1)),
    )
    if "tiny" in args:
        config.model.update(
            d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, vocab_size=1024
        )
        config.model.update(head_dim=64, logits_chunk=64, max_len=256)
        config.data.update(seq_len=256, batch_size=8, vocab_size=1024)
    return config
