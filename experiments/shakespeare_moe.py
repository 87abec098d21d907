r"""The README's main job with a mixture-of-experts MLP: experiments/shakespeare_gpt.py with
each layer's MLP (width 1024) replaced by 4 experts of width 512, each token routed to its
top 2. A token so uses as many parameters as in the dense model (the same active count up
to the router), while the model holds twice the MLP parameters.

Command (2-core CPU; 7 min 14 s on 2026-11-30 under dense dispatch, not re-timed since):

    python -m lm.main --config experiments/shakespeare_moe.py --workdir workdirs/shakespeare_moe

Measured on the 2-core CPU dev machine (2026-12-07, dropless dispatch with the CPU's block
form, rows packed by `lm.data.packing`), 480 steps of 16 x 256 tokens as the dense run, beside
the dense run's docstring numbers of the same day (experiments/shakespeare_gpt.py):

                        validation loss      perplexity        bits/byte
    step  train loss    MoE     dense       MoE    dense      MoE    dense
     160     4.77      4.879    4.869      131.5   130.1     2.470   2.465
     320     4.59      4.642    4.643      103.7   103.9     2.350   2.351
     480     4.35      4.527    4.529       92.5    92.7     2.292   2.293

    parameters: MoE 6,382,080 total, 4,278,784 active per token; dense 4,273,664 (all active)
    aux/load_balancing (4 layers x 0.01 x the Switch ratio, 0.04 when balanced): 0.043 at
      step 20, 0.040 from step 160 on: the router keeps the experts evenly used
    unigram baseline (add-one, fit on train): 6.063 nats/token on validation
    wall time: 41 min for the whole command, measured with a TPU compile and the test suite
      running beside it on the 2 cores (not a speed measurement: `python -m lm.bench moe`
      times the dispatches against the dense step, 1.45x for dropless at 8 experts here)

So at equal active parameters and the same tokens, the mixture is as good as the dense model
(4.527 against 4.529 validation loss at step 480) at this small scale and step count; its
extra parameters do not pay off in 2M tokens.

Arg: 'tiny' gives a seconds-long smoke run (used by the tests).
"""

import pathlib

from lm.config import config_of


def get_config(arg: str | None = None):
    # experiments/shakespeare_gpt.py's config for the same arg ('tiny' is the one it takes).
    config = config_of(pathlib.Path(__file__).with_name("shakespeare_gpt.py"), arg)
    config.model.update(
        mlp_dim=config.model.mlp_dim // 2,  # each expert's width: 2 of 4 = the dense MLP's
        num_experts=4,
        experts_per_token=2,
        router_aux_loss=0.01,  # Switch Transformer's coefficient
    )
    return config
