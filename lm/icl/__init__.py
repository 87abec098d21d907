"""In-context learning: function classes and baselines (Garg et al. 2022), induction heads
(Olsson et al. 2022), and few-shot curves of language models.

An ICL experiment file returns a config with an `icl` section whose `kind` names the
experiment; `python -m lm.main --config FILE --workdir DIR` hands it to `run_experiment`.
"""

from __future__ import annotations

import pathlib


def run_experiment(config, workdir: pathlib.Path) -> dict:
    """Run the ICL experiment that `config.icl.kind` names; returns its final metrics."""
    kind = config.icl.kind
    if kind == "regression":
        from lm.icl import regression

        return regression.run(config, workdir)
    if kind == "induction":
        from lm.icl import induction

        return induction.run(config, workdir)
    raise ValueError(f"icl.kind={kind!r} is not one of ('regression', 'induction')")
