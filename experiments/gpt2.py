r"""GPT-2 124M / 350M / 774M / 1.5B on C4 (English), nanoGPT's recipe, for one 8-GPU box.

Train (one process drives the box's 8 GPUs; see launch/gpu.py):

    python -m lm.main --config experiments/gpt2.py:124m --workdir workdirs/gpt2_124m

Check every size before the box is booked (any machine: 8 host devices stand in for the
GPUs; argument sizes are exact, temporaries are the CPU compiler's):

    python -m launch.sweep experiments/gpt2.py --compile_only --topology cpu:8 \
        --device_memory_gib 80

The sizes of Radford et al. (2019), as nanoGPT trains them: context 1,024, vocabulary 50,304
(GPT-2's 50,257 rounded up to a multiple of 64), no dropout, tied embeddings, AdamW (lr 6e-4
for 124M, smaller for larger models, betas 0.9 / 0.95, weight decay 0.1, clipping 1.0),
warmup 2,000 steps then cosine decay to a tenth over 600,000 steps; 12 rows of 1,024 per
GPU per micro-batch, 5 micro-batches per step: 480 x 1,024 = 491,520 tokens a step. bf16
compute over float32 parameters, data parallel over the 8 GPUs (mesh 8,1,1), cuDNN
attention where it applies (model.attention_impl='auto'). The tokenizer is a SentencePiece
model of that vocabulary trained on C4's training split.

Arg: '124m' (default), '350m', '774m', '1.5b'; 'tiny' (with a size: a 2-layer model of the
same family, for tests). The sweep (`get_sweep`) is the four sizes.

Compiled for 8 host devices with the sweep command above (2026-12-06, 2-core CPU; GiB per
device of the train step, temporaries as the CPU compiler counts them: an estimate for a GPU):

    size   remat          GiB per device  temporaries  FLOPs per step  MFU ceiling
    124M   dots_saveable  17.84           16.44        4.23e14         100%
    350M   dots_saveable  37.75           33.78        1.20e15         100%
    774M   dots_saveable  67.37           58.72        2.56e15         100%
    1.5B   full           39.64           22.23        5.06e15         75%

(1.5B with dots_saveable: 114.15 GiB, does not fit in 80.) The 124M shape has run on one H200
(README, "Accelerators"); this experiment as a whole has not.
"""

from lm.config import experiment, experiment_args

# name: (layers, heads, d_model, peak learning rate, remat). 1.5B keeps only each layer's
# input: saving its matmul outputs too needs more than an 80 GB GPU holds (README).
SIZES = {
    "124m": (12, 12, 768, 6e-4, "dots_saveable"),
    "350m": (24, 16, 1024, 3e-4, "dots_saveable"),
    "774m": (36, 20, 1280, 2.5e-4, "dots_saveable"),
    "1.5b": (48, 25, 1600, 2e-4, "full"),
}


def get_config(arg: str | None = None):
    args = experiment_args(arg, *SIZES, "tiny")
    sizes = [a for a in args if a in SIZES] or ["124m"]
    if len(sizes) > 1:
        raise ValueError(f"experiments/gpt2.py takes one size, got {sizes}")
    layers, heads, width, learning_rate, remat = SIZES[sizes[0]]
    config = experiment(
        preset="gpt2",
        model=dict(
            d_model=width,
            num_layers=layers,
            num_heads=heads,
            mlp_dim=4 * width,
            vocab_size=50_304,
            max_len=1024,
            dropout=0.0,
            precision="bf16",
            remat=remat,
        ),
        data=dict(
            source="tfds:c4/en",
            text_key="text",
            task="lm",
            seq_len=1024,
            batch_size=480,
            vocab_size=50_304,
        ),
        optimizer=dict(
            name="adamw",
            learning_rate=learning_rate,
            warmup_steps=2000,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            clip_norm=1.0,
            grad_accum_steps=5,
        ),
        train=dict(steps=600_000, log_every=10, eval_every=2000, checkpoint_every=1000),
        parallel=dict(mesh=(8, 1, 1)),
    )
    if "tiny" in args:
        config.model.update(num_layers=2, num_heads=4, d_model=64, mlp_dim=256)
        config.model.update(vocab_size=512, max_len=128)
        config.data.update(seq_len=128, batch_size=40, vocab_size=512)
    return config


def get_sweep(arg: str | None = None):
    """The four sizes, each as its experiment arg gives it ('tiny': two small widths)."""
    if "tiny" in experiment_args(arg, *SIZES, "tiny"):
        return [
            {"name": f"d{width}", "model.d_model": width, "model.mlp_dim": 4 * width}
            for width in (64, 128)
        ]
    points = []
    for name in SIZES:
        layers, heads, width, learning_rate, remat = SIZES[name]
        points.append(
            {
                "name": name,
                "model.num_layers": layers,
                "model.num_heads": heads,
                "model.d_model": width,
                "model.mlp_dim": 4 * width,
                "optimizer.learning_rate": learning_rate,
                "model.remat": remat,
            }
        )
    return points
