"""Shared fixtures: the default study and small synthetic cohorts written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploy.flower import quiet_flower_environment

quiet_flower_environment()
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STUDY = ROOT / "studies" / "depression-risk.toml"


@pytest.fixture(scope="session")
def study():
    from fedcare.study import load_study

    return load_study(DEFAULT_STUDY)


@pytest.fixture(scope="session")
def cohorts_dir(study, tmp_path_factory):
    from simulations.cohorts import write_cohorts

    out = tmp_path_factory.mktemp("cohorts")
    write_cohorts(study, out, hospitals=4, seed=7)
    return out
