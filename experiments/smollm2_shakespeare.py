r"""Fine-tune the imported SmolLM2-135M-Instruct on the Shakespeare corpus (full or LoRA).

Commands (2-core CPU):

    python -m lm.main --config experiments/smollm2_shakespeare.py --workdir workdirs/smollm2_ft
    python -m lm.main --config experiments/smollm2_shakespeare.py:lora --workdir workdirs/smollm2_lora

`train.init_from='smollm2'` loads the GGUF checkpoint from the assets registry into the
Llama-family modules (the `llama` preset is SmolLM2's shape) and the workdir adopts
SmolLM2's own tokenizer (byte-level BPE, 49,152 pieces, no BOS). The held-out loss is
measured before the first step (`eval_at_start`) and every `eval_every` steps on the
first 8 validation batches (Coriolanus, Macbeth, Sonnets: whole works never trained on).

Measured on the 2-core CPU dev machine (2026-11-23), 40 steps of 8 x 128 tokens:

    run                      trained params   wall time   held-out loss 0 -> 20 -> 40   bits/byte
    full (lr 5e-5)           134,515,008      8 min 11 s  4.218 -> 3.868 -> 3.811       1.677
    :lora (rank 8, lr 1e-3)  2,442,240        7 min 14 s  4.218 -> 3.865 -> 3.806       1.675

Arg: 'lora' trains rank-8 adapters on every attention and MLP projection instead of all
135M parameters; 'tiny' is a few-step smoke run (used by the slow tests).
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "lora", "tiny")
    config = experiment(
        preset="llama",  # SmolLM2-135M: 30 layers, d 576, 9 heads / 3 KV heads, vocab 49,152
        model=dict(vocab_size=0),
        data=dict(source="shakespeare", task="lm", seq_len=128, batch_size=8),
        optimizer=dict(name="adamw", learning_rate=5e-5, warmup_steps=10, weight_decay=0.0),
        train=dict(
            init_from="smollm2",
            steps=40,
            log_every=10,
            eval_every=20,
            eval_batches=8,
            eval_at_start=True,
            checkpoint_every=20,
            keep_checkpoints=1,
            sample_prompt="ROMEO.\n",
            sample_tokens=60,
        ),
    )
    if "lora" in args:
        config.train.update(lora_rank=8, lora_alpha=16.0)
        config.optimizer.update(learning_rate=1e-3)
    if "tiny" in args:
        config.data.update(seq_len=32, batch_size=2)
        config.train.update(
            steps=3, log_every=1, eval_every=3, eval_batches=2, checkpoint_every=3, sample_tokens=8
        )
    return config
