"""One LightningDataModule for every task: a train and a val dataset, the task's targets, the pipelines."""

import lightning as L
from torch.utils.data import DataLoader, Dataset

from .feature_cache import cached_training_set, collate_cached
from .transforms import Transformed, collate, eval_transform, train_transform


class DenseDataModule(L.LightningDataModule):
    """Wraps raw datasets (built and path-checked before training starts) with augmentation and batching.

    Args:
        train, val: raw datasets (``dense_data`` readers or the synthetic set).
        targets: what the task trains on: any of ``mask``, ``depth``, ``boxes``, ``label``.
        num_classes: classes of the label space; ``class_names`` default to the dataset's or ``class_<i>``.
        crop_size, base_size, scale_range, flip, photometric: the training pipeline (``train_transform``).
        eval_short_side, eval_center_crop: the evaluation pipeline (``eval_transform``).
        cache: ``data.cache`` (``conf/cache/features.yaml``): with ``enabled``, the training set is read from the
            frozen-feature cache (``dense_data.feature_cache``), prepared with the trainer's backbone.
    """

    def __init__(self, train: Dataset, val: Dataset, targets: list[str], num_classes: int | None = None,
                 class_names: list[str] | None = None, crop_size: int | list[int] = 512, base_size: int | None = None,
                 scale_range: list[float] = (0.5, 2.0), flip: bool = True, photometric: bool = True,
                 eval_short_side: int | None = None, eval_center_crop: int | None = None, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 2, cache: dict | None = None):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.targets = tuple(targets)
        self.num_classes = num_classes
        names = class_names or getattr(train, "class_names", None)
        if num_classes is not None and (names is None or len(names) != num_classes):
            names = [f"class_{i}" for i in range(num_classes)]
        self.class_names = list(names) if names is not None else None
        crop = crop_size if isinstance(crop_size, int) else tuple(crop_size)
        self.train_pipeline = train_transform(self.targets, crop, base_size, tuple(scale_range), flip, photometric)
        self.eval_pipeline = eval_transform(eval_short_side, eval_center_crop)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.cache = dict(cache) if cache and cache.get("enabled") else None

    def _loader(self, dataset: Dataset, batch_size: int, train: bool, collate_fn=collate) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train and len(dataset) > batch_size,
                          num_workers=self.num_workers, collate_fn=collate_fn,
                          persistent_workers=self.num_workers > 0, pin_memory=False)

    def train_dataloader(self) -> DataLoader:
        if self.cache is not None:
            return self._loader(cached_training_set(self, self.trainer), self.batch_size, True, collate_cached)
        dataset = Transformed(self.train_set, self.train_pipeline, self.targets, resize_labels=True)
        return self._loader(dataset, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        dataset = Transformed(self.val_set, self.eval_pipeline, self.targets, resize_labels=False)
        return self._loader(dataset, self.val_batch_size, train=False)
