"""One LightningDataModule for every task: a train and a val dataset, the task's targets, the pipelines."""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .sampling import ResumableLoader, ResumableSampler
from .feature_cache import cached_training_set, collate_cached
from .transforms import Transformed, collate, eval_transform, train_transform


class DenseDataModule(L.LightningDataModule):
    """Wraps raw datasets (built and path-checked before training starts) with augmentation and batching.

    Args:
        train, val: raw datasets (``dense_data`` readers or the synthetic set).
        targets: what the task trains on: any of ``mask``, ``depth``, ``boxes``, ``label``.
        num_classes: classes of the label space; ``class_names`` default to the dataset's or ``class_<i>``.
        crop_size, base_size, scale_range, flip, photometric, fixed_crop, rotate: the training pipeline (``train_transform``).
        eval_short_side, eval_center_crop: the evaluation pipeline (``eval_transform``).
        seed: the training order and augmentations (``ResumableSampler``); None: ``torch.initial_seed()``, i.e.
            train.py's ``seed``.
        cache: ``data.cache`` (``conf/cache/features.yaml``): with ``enabled``, the training set is read from the
            frozen-feature cache (``dense_data.feature_cache``), prepared with the trainer's backbone.
    """

    def __init__(self, train: Dataset, val: Dataset, targets: list[str], num_classes: int | None = None,
                 class_names: list[str] | None = None, crop_size: int | list[int] = 512, base_size: int | None = None,
                 scale_range: list[float] = (0.5, 2.0), flip: bool = True, photometric: bool = True,
                 fixed_crop: list[int] | None = None, rotate: float = 0.0,
                 eval_short_side: int | None = None, eval_center_crop: int | None = None, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 2, seed: int | None = None,
                 cache: dict | None = None):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.targets = tuple(targets)
        self.num_classes = num_classes
        names = class_names or getattr(train, "class_names", None)
        if num_classes is not None and (names is None or len(names) != num_classes):
            names = [f"class_{i}" for i in range(num_classes)]
        self.class_names = list(names) if names is not None else None
        crop = crop_size if isinstance(crop_size, int) else tuple(crop_size)
        self.train_pipeline = train_transform(self.targets, crop, base_size, tuple(scale_range), flip, photometric,
                                              tuple(fixed_crop) if fixed_crop else None, float(rotate))
        self.eval_pipeline = eval_transform(eval_short_side, eval_center_crop)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache = dict(cache) if cache and cache.get("enabled") else None

    def _options(self, collate_fn=collate) -> dict:
        # Own generators: creating the loaders' iterators leaves the global torch RNG (dropout, point sampling)
        # untouched, so a resumed run draws the same numbers as an uninterrupted one.
        return dict(num_workers=self.num_workers, collate_fn=collate_fn, persistent_workers=self.num_workers > 0,
                    pin_memory=False, generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches in an order (and with augmentations) a checkpoint resumes mid-epoch; with ``cache``,
        the frozen features of the cache's fixed views instead of images."""
        seed = (torch.initial_seed() if self.seed is None else self.seed) % 2**32
        if self.cache is not None:
            dataset = cached_training_set(self, self.trainer)
            return ResumableLoader(dataset, self.batch_size, ResumableSampler(dataset, seed=seed),
                                   drop_last=len(dataset) > self.batch_size, **self._options(collate_cached))
        dataset = Transformed(self.train_set, self.train_pipeline, self.targets, resize_labels=True)
        return ResumableLoader(dataset, self.batch_size, ResumableSampler(dataset, seed=seed),
                               drop_last=len(dataset) > self.batch_size, **self._options())

    def val_dataloader(self) -> DataLoader:
        dataset = Transformed(self.val_set, self.eval_pipeline, self.targets, resize_labels=False)
        return DataLoader(dataset, batch_size=self.val_batch_size, shuffle=False, **self._options())
