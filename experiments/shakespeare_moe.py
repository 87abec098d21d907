r"""The README's main job with a mixture-of-experts MLP: experiments/shakespeare_gpt.py with
each layer's MLP (width 1024) replaced by 4 experts of width 512, each token routed to its
top 2. A token so uses as many parameters as in the dense model (the same active count up
to the router), while the model holds twice the MLP parameters.

Command (2-core CPU, about 7 minutes):

    python -m lm.main --config experiments/shakespeare_moe.py --workdir workdirs/shakespeare_moe

Measured on the 2-core CPU dev machine (2026-11-30, rows packed by grain's first-fit packer
then), 480 steps of 16 x 256 tokens as the dense run, beside the dense run of that day (since
rows are packed by `lm.data.packing`, the dense run gives 4.529; this one is not re-measured):

                        validation loss      perplexity        bits/byte
    step  train loss    MoE     dense       MoE    dense      MoE    dense
     160     4.87      4.929    4.902      138.2   134.6     2.496   2.482
     320     4.46      4.634    4.623      103.0   101.8     2.347   2.341
     480     4.52      4.551    4.537       94.8    93.4     2.305   2.297

    parameters: MoE 6,382,080 total, 4,278,784 active per token; dense 4,273,664 (all active)
    aux/load_balancing (4 layers x 0.01 x the Switch ratio, 0.04 when balanced): 0.043 at
      step 20, 0.040 from step 300 on: the router keeps the experts evenly used
    unigram baseline (add-one, fit on train): 6.063 nats/token on validation
    wall time on the idle machine: 7 min 14 s for the whole command, a median 4,910
      tokens/s; the dense command, run just before it, took 5 min 46 s at 6,200 tokens/s and
      gave its docstring's losses exactly. The dense dispatch runs all 4 experts on every
      token, twice the active MLP FLOPs: a MoE step costs about 1.26x a dense one.

So at equal active parameters and the same tokens, the mixture is as good as the dense model
(0.3% worse validation loss at step 480) at this small scale and step count; its extra
parameters do not pay off in 2M tokens.

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
