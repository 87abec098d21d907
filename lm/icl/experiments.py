"""The ICL experiment kinds, by the name an experiment file gives in ``icl.kind``."""

from __future__ import annotations

from typing import Any

from lm.icl import induction, regression, runs

KINDS = {"regression": regression.build_run, "induction": induction.build_run}


def run_experiment(config, workdir, started_at: float | None = None) -> dict[str, Any]:
    """Trains (or resumes) the ICL experiment that ``config.icl.kind`` names in ``workdir``,
    then writes and returns its results (see the kind's module). started_at: when the process
    started, for the goodput ledger (None: when training begins)."""
    kind = runs.section_values(config)["icl"].get("kind")
    if kind not in KINDS:
        raise ValueError(f"icl.kind={kind!r} is not one of {tuple(KINDS)}")
    return runs.train_run(KINDS[kind], config, workdir, started_at)
