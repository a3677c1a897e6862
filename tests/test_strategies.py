"""``trainer=slurm`` and ``trainer=fsdp``: the configs build their Lightning pieces; FSDP's wrapping trains right.

Lightning's ``FSDPStrategy`` refuses a CPU accelerator, so the 2-process check runs PyTorch's FSDP on CPU (gloo,
``device_id=cpu``) with exactly the wrapping arguments the strategy carries, and compares one optimizer step with
the same step on one process without FSDP.
"""

import os
import socket
import sys
import traceback

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import OmegaConf

from tasks import SegmentationTask
from train import _trainer_options

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _trainer_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def _task(freeze: str) -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(backbone={"name": "vit_test", "freeze": freeze, "last_n": 2, "lora_rank": 4},
                            head={"_target_": "heads.LinearSegHead", "dropout": 0.0}, num_classes=3)


def test_slurm_trainer_takes_nodes_and_tasks_from_the_job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    options = _trainer_options(_trainer_config("trainer=slurm"), module=None)
    assert (options["num_nodes"], options["devices"], options["strategy"]) == (4, 8, "ddp")
    environment = options["plugins"][0]
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


@pytest.mark.parametrize("freeze", ["frozen", "last_n", "lora"])
def test_fsdp_strategy_leaves_frozen_tensors_out(freeze):
    task = _task(freeze)
    options = _trainer_options(_trainer_config("trainer=fsdp"), module=task)
    strategy = options["strategy"]
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"]
    ignored = {id(p) for p in strategy.kwargs["ignored_states"]}
    assert ignored == {id(p) for p in task.parameters() if not p.requires_grad}
    assert {type(b) for b in task.backbone.model.blocks} == strategy.kwargs["auto_wrap_policy"]._module_classes
    with pytest.raises(ValueError, match="requires a GPU accelerator"):  # Lightning's FSDP is GPU-only
        L.Trainer(**dict(options, accelerator="cpu", precision="32-true"), logger=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model, task, images, masks) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = sum(task.head.loss(model(images), {"mask": masks}).values())
    loss.backward()
    optimizer.step()


def _fsdp_worker(rank: int, port: int, results: dict) -> None:
    """Runs in a spawned process; leaves with ``os._exit`` so that no C++ destructor of gloo's threads runs at
    interpreter exit (seen: ``terminate called without an active exception``, SIGABRT, after the work was done)."""
    try:
        _fsdp_steps(rank, port, results)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)


def _fsdp_steps(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    try:
        for freeze in ("last_n", "lora"):
            task = _task(freeze)
            strategy = _trainer_options(_trainer_config("trainer=fsdp"), module=task)["strategy"]
            model = FSDP(task, device_id=torch.device("cpu"), **strategy.kwargs)
            units = sum(isinstance(m, FSDP) for m in model.modules())
            generator = torch.Generator().manual_seed(1)  # the same batch on both ranks: the mean gradient is its own
            images = torch.randn(2, 3, 32, 32, generator=generator)
            masks = torch.randint(0, 3, (2, 32, 32), generator=generator)
            _step(model, task, images, masks)
            with FSDP.summon_full_params(model):
                if rank == 0:
                    results[freeze] = ({n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                                        for n, p in task.named_parameters() if p.requires_grad}, units)
        dist.barrier()  # no rank tears gloo down while the other still talks to it (seen: SIGABRT at exit)
    finally:
        dist.destroy_process_group()


def test_fsdp_wrapping_trains_like_one_process_on_cpu():
    results = mp.Manager().dict()
    mp.spawn(_fsdp_worker, args=(_free_port(), results), nprocs=2)
    for freeze in ("last_n", "lora"):
        sharded, units = results[freeze]
        assert units == 1 + 4  # the root (head and the rest) and one unit per block
        task = _task(freeze)
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(2, 3, 32, 32, generator=generator)
        masks = torch.randint(0, 3, (2, 32, 32), generator=generator)
        _step(task, task, images, masks)
        reference = {n: p.detach() for n, p in task.named_parameters() if p.requires_grad}
        assert sharded.keys() == reference.keys() and sharded
        for name, value in reference.items():
            torch.testing.assert_close(sharded[name], value, atol=1e-5, rtol=1e-5, msg=name)
