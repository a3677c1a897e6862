"""A training data order that a checkpoint can resume mid-epoch: no sample replayed or skipped, same augmentations.

The order of epoch ``e`` is a permutation drawn from ``(seed, e)``; each position also gets its own augmentation
seed from the same draw, handed to the dataset with the index (``(index, seed)``). Augmentations therefore depend
on neither the worker that loads a sample nor the workers' random states, and a resumed run only needs the epoch
and the number of batches already consumed, which ``ResumableLoader.state_dict`` records (Lightning stores it in
every checkpoint and hands it back on ``fit(ckpt_path=...)``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SEED_RANGE = 2**31 - 1


class ResumableSampler(DistributedSampler):
    """Shuffled ``(index, augmentation_seed)`` pairs per epoch, sharded over processes, resumable at any position.

    A ``DistributedSampler`` (Lightning then keeps it as it is under DDP / FSDP) that reads the process group
    itself when one is running; on one process it yields the whole epoch. ``skip`` samples of this process's shard
    are left out at the start of the next iteration (set by ``ResumableLoader`` when resuming).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def epoch_order(self, epoch: int) -> tuple[list[int], list[int]]:
        """Indices and augmentation seeds of this process's share of ``epoch``: two lists of ``num_samples``."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        size = len(self.dataset)
        order = torch.randperm(size, generator=generator) if self.shuffle else torch.arange(size)
        seeds = torch.randint(0, SEED_RANGE, (size,), generator=generator)
        if self.drop_last:
            order, seeds = order[:self.total_size], seeds[:self.total_size]
        else:
            repeat = -(-self.total_size // size)
            order, seeds = order.repeat(repeat)[:self.total_size], seeds.repeat(repeat)[:self.total_size]
        share = slice(self.rank, self.total_size, self.num_replicas)
        return order[share].tolist(), seeds[share].tolist()

    def __iter__(self):
        skip, self.skip = self.skip, 0
        order, seeds = self.epoch_order(self.epoch)
        yield from zip(order[skip:], seeds[skip:])


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over a ``ResumableSampler`` whose ``state_dict`` is the epoch and the batches
    handed out in it (Lightning does not pre-fetch from loaders with a length, so handed out = trained on)."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler, **kwargs):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.consumed = 0
        self._resume_at = 0

    def __iter__(self):
        self.consumed, self._resume_at = self._resume_at, 0
        self.sampler.skip = self.consumed * self.batch_size
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self.consumed, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved after the epoch's last batch: the next iteration starts a new epoch
            epoch, batches = epoch + 1, 0
        self.sampler.seed = int(state.get("seed", self.sampler.seed))
        self.sampler.set_epoch(epoch)
        self._resume_at = batches
