"""Helpers shared by the test modules."""

import pytest


def slow_except(values, *keep):
    """Parameters for `pytest.mark.parametrize` (or fixture params): those in `keep` run in the
    default suite, the others only with the slow tests (`pytest -m slow`, run by CI)."""
    return [v if v in keep else pytest.param(v, marks=pytest.mark.slow) for v in values]
