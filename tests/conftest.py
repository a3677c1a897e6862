"""Test-wide settings: no network for weights, quiet albumentations, small thread pools."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]


def run_train(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python train.py`` with Hydra overrides in a subprocess, as a user would."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def train_cli():
    return run_train
