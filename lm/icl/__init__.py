"""In-context learning: function classes and baselines (Garg et al. 2022), induction heads
(Olsson et al. 2022), and few-shot curves of language models.

An ICL experiment file returns an ordinary config (model, optimizer, train, parallel) plus an
`icl` section whose `kind` names the experiment; `python -m lm.main --config FILE --workdir
DIR` trains it with lm.train's loop through `run_experiment` (`lm.icl.experiments`).
"""

from __future__ import annotations

from lm.icl.experiments import run_experiment

__all__ = ["run_experiment"]
