r"""In-context linear regression (Garg et al. 2022, "What can Transformers learn in-context?").

A Transformer sees x_1, w.x_1, ..., x_k, w.x_k, x_{k+1} with a fresh w ~ N(0, I_d) in every
prompt and learns to predict w.x_{k+1}; after training its error per k is compared with
least squares, 3-nearest-neighbours and averaging (lm.icl.regression).

Commands:

    # the paper's run (d=20, 41 points, 12 layers x 256, 500k steps): an accelerator
    python -m lm.main --config experiments/garg_linear_regression.py --workdir workdirs/garg
    # reduced scale for a 2-core CPU (d=5, 11 points, 4 layers x 64)
    python -m lm.main --config experiments/garg_linear_regression.py:small --workdir workdirs/garg_small

Outputs: WORKDIR/errors.json, WORKDIR/error_vs_k.png, a printed table; rerunning a finished
run re-evaluates only.

Measured ('small') on the 2-core CPU dev machine (2026-11-30, through lm.train's loop), 0.20M
parameters, 20,000 steps of 64 prompts; evaluated on 2,048 fixed prompts at d=5 (squared
error / d):

      k    model   least squares   3-NN    averaging
      0    0.978       0.975       0.975     0.975
      1    0.852       0.849       2.027     5.982
      2    0.552       0.553       1.431     2.799
      3    0.426       0.411       1.331     1.753
      4    0.251       0.211       1.054     1.479
      5    0.114       0.000       0.922     1.145
      6    0.057       0.000       0.814     0.963
      7    0.029       0.000       0.775     0.915
      8    0.021       0.000       0.664     0.744
      9    0.012       0.000       0.626     0.655
     10    0.015       0.000       0.605     0.606

    wall time: 33.5 min for the whole command under `nice -n 10` beside two other jobs (a
    median 29.8 steps/s; the loop it replaced ran 12.4 steps/s on a quieter machine); rerunning
    it on the finished workdir re-evaluates in 5 s. The model tracks least squares below
    k = d and comes close to it (not exact) from k = d on, as in Garg et al.'s Figure 2.
    (The run of 2026-11-29, with the old loop's random streams, gave 0.084 at k = 5 and 0.008
    at k = 10.)

Sweep (`get_sweep`, python -m launch.sweep experiments/garg_linear_regression.py:small
--workdir DIR): model.num_layers 2 and 4, sorted by eval/loss.

Arg: '' = the paper's scale; 'small' = 2-core CPU; 'tiny' = a seconds-long smoke run (tests).
"""

from lm.config import sweep_axis
from lm.icl.regression import experiment


def get_config(arg: str | None = None):
    if arg in (None, ""):
        # Garg et al.: GPT-2 (12 layers, 256 wide, 8 heads), batch 64, Adam 1e-4, 500k steps;
        # curriculum: dims 5 -> 20 (+1 every 2000 steps), points 11 -> 41 (+2 every 2000).
        return experiment(
            icl=dict(
                function="linear_regression",
                n_dims=20,
                n_points=41,
                batch_size=64,
                dims_start=5,
                dims_increment=1,
                dims_interval=2000,
                points_start=11,
                points_increment=2,
                points_interval=2000,
                eval_batches=16,
            ),
            train=dict(
                steps=500_000,
                log_every=100,
                eval_every=10_000,
                checkpoint_every=10_000,
            ),
            model=dict(d_model=256, num_layers=12, num_heads=8, mlp_dim=1024),
            optimizer=dict(
                name="adamw",
                learning_rate=1e-4,
                warmup_steps=0,
                end_learning_rate_fraction=1.0,
                weight_decay=0.0,
                b2=0.999,
                clip_norm=0.0,
            ),
        )
    if arg == "small":
        return experiment(
            icl=dict(
                function="linear_regression",
                n_dims=5,
                n_points=11,
                batch_size=64,
                dims_start=2,
                dims_increment=1,
                dims_interval=1000,
                points_start=5,
                points_increment=2,
                points_interval=1000,
                eval_batches=32,
            ),
            train=dict(
                steps=20_000,
                log_every=100,
                eval_every=1000,
                checkpoint_every=2000,
            ),
            model=dict(d_model=64, num_layers=4, num_heads=4, mlp_dim=256),
            optimizer=dict(
                name="adamw",
                learning_rate=1e-3,
                warmup_steps=500,
                end_learning_rate_fraction=0.1,
                weight_decay=0.0,
                b2=0.999,
                clip_norm=1.0,
            ),
        )
    if arg == "tiny":
        return experiment(
            icl=dict(
                function="linear_regression",
                n_dims=3,
                n_points=7,
                batch_size=16,
                dims_start=2,
                dims_interval=5,
                points_start=4,
                points_interval=5,
                eval_batches=2,
            ),
            train=dict(
                steps=20,
                log_every=5,
                eval_every=10,
                checkpoint_every=10,
                progress=False,
            ),
            model=dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64),
            optimizer=dict(
                learning_rate=1e-3,
                warmup_steps=0,
                end_learning_rate_fraction=1.0,
                weight_decay=0.0,
                clip_norm=1.0,
            ),
        )
    raise ValueError(f"unknown arg {arg!r}: use '', 'small' or 'tiny'")


def get_sweep(arg: str | None = None):
    """Model depth, 2 points (table sorted by eval/loss: the squared error at full d and n)."""
    get_config(arg)  # a bad arg fails here, before any point runs
    return sweep_axis("model.num_layers", [2, 4])
