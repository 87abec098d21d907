r"""The README's main job with a mixture-of-experts MLP: experiments/shakespeare_gpt.py with
each layer's MLP (width 1024) replaced by 4 experts of width 512, each token routed to its
top 2. A token so uses as many parameters as in the dense model (the same active count up
to the router), while the model holds twice the MLP parameters.

Command (2-core CPU, about 9 minutes):

    python -m lm.main --config experiments/shakespeare_moe.py --workdir workdirs/shakespeare_moe

Measured: (filled in after the run)

Arg: 'tiny' gives a seconds-long smoke run (used by the tests).
"""

from lm.config import experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    config = experiment(
        preset="gpt2",
        model=dict(
            d_model=256,
            num_layers=4,
            num_heads=4,
            mlp_dim=512,  # each expert's width: 2 of 4 experts = the dense model's 1024
            num_experts=4,
            experts_per_token=2,
            router_aux_loss=0.01,  # Switch Transformer's coefficient
            max_len=256,
            dropout=0.0,
        ),
        data=dict(source="shakespeare", task="lm", seq_len=256, batch_size=16, vocab_size=4096),
        optimizer=dict(
            name="adamw", learning_rate=2e-3, warmup_steps=50, weight_decay=0.1, clip_norm=1.0
        ),
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
        config.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=32, max_len=64)
        config.data.update(seq_len=64, batch_size=8, vocab_size=512)
        config.optimizer.update(warmup_steps=5)
        config.train.update(
            steps=20, log_every=5, eval_every=10, checkpoint_every=10, sample_tokens=16
        )
    return config
