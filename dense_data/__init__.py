"""Datasets: readers returning raw samples, the synthetic scene generator, pipelines and the DataModule."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
