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
traced for, so also when compiling for a slice from a CPU host). One row of 8,192 tokens per chip (a global batch of 16 x 8,192 = 131k
tokens), bf16 compute over float32 parameters and Adam moments sharded over every chip
(FSDP: the expert kernels' expert axis would take the fsdp mesh axis, `lm.parallel.
DEFAULT_RULES`, but 8 experts do not divide 16 chips, so their embed axis takes it), remat
full, logits made 1,024 positions at a time. The tokenizer is a SentencePiece model of the
same vocabulary trained on C4's training split (or set data.tokenizer to one you have).

Compiled from the 2-core CPU dev machine (2026-12-07, commit 540aa2f, jax 0.10.2, libtpu
0.0.42.1), one row of 8,192 per chip (--config.data.batch_size = chips), GiB per chip: state
+ temporaries of the train step, of 95.74 GiB HBM; the default mesh (1,-1,1), then meshes
whose fsdp axis of 8 or 4 divides the experts (--config.parallel.mesh=...: expert
parallelism, each device's tokens sent to their experts' devices, `model.moe_exchange`):

    topology        mesh     batch        GiB per chip           step at peak  MFU ceiling  compile
    v5p:2x2x2 (8)   1,8,1    8 x 8,192    does not fit: the compiler needs 116.29
    v5p:2x2x4 (16)  1,16,1   16 x 8,192   93.41 (32.62 + 60.73)  2.15 s        75%          241 s
    v5p:2x4x4 (32)  1,32,1   32 x 8,192   91.30 (16.31 + 74.94)  2.15 s        75%          185 s
    v5p:4x4x4 (64)  1,64,1   64 x 8,192   does not fit: the compiler needs 127.63
    v5p:4x4x8 (128) 1,128,1  128 x 8,192  does not fit: the compiler needs 234.00
    v5p:2x2x4 (16)  1,8,2    16 x 8,192   87.43 (32.62 + 54.73)  2.15 s        75%          131 s
    v5p:2x4x4 (32)  1,8,4    32 x 8,192   71.66 (16.31 + 55.27)  2.15 s        75%          197 s
    v5p:4x4x4 (64)  4,4,4    64 x 8,192   87.11 (32.62 + 54.41)  2.15 s        75%          354 s
    v5p:4x4x8 (128) 4,8,4    128 x 8,192  71.17 (16.31 + 54.78)  2.15 s        75%          376 s

So the smallest v5p slice it fits is v5p-16 (the float32 state alone is 522 GiB), with 2.33
GiB to spare on the default mesh and 8.31 on (1,8,2). On the default mesh 8 experts do not
divide the fsdp axis beyond 8 chips, the expert kernels split their embed axis instead, and
the dispatch's temporaries grow with the global batch, not the rows per chip (the compiler's
largest buffers are [every assignment of the global batch, 14,336] expert activations on
each chip): beyond v5p-32 it needs an expert-parallel mesh, whose temporaries stay near 55
GiB per chip (v5p-128 at 1M tokens a step on (4,8,4); (1,8,8) and (2,8,4) do not map onto
the 4x4x4 torus). 128 rows in 4 accumulation steps on v5p-32's default mesh
(--config.optimizer.grad_accum_steps=4) compiles its train step but not its eval step
(120.91 GiB: evaluation takes the whole batch at once). The compile times are of a machine
shared with other jobs (the v5p-32 default-mesh compile took 96 to 370 s over three runs,
the same memory each time). No TPU has run it: step times are the ceilings at the chips'
459 TFLOP/s (6 x the 12.9B active parameters + attention per token, and remat's recompute),
not measurements.

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
