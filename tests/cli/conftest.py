"""Fixtures shared by the CLI tests."""

import shutil

import pytest


@pytest.fixture
def files(samples, tmp_path):
    """The shipped digits MLP with its calibration and held-out sets, copied into ``tmp_path``."""
    for name in ("mlp_digits_mid.safetensors", "digits_calibration.safetensors", "digits_holdout.safetensors"):
        shutil.copy(samples / name, tmp_path / name)
    return tmp_path
