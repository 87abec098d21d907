"""Launchers: they run `python -m lm.main` (locally, as sweeps, or on clusters) and import no training code."""
