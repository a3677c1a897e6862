"""Trainer strategies built with the task in hand (``trainer.strategy: {_target_: ...}`` receives ``module=``).

``fsdp_strategy``: Lightning's ``FSDPStrategy`` that shards each transformer block (or ConvNeXt stage) of the
backbone as one unit and leaves every frozen tensor out of FSDP (``ignored_states``): frozen tensors are neither
sharded nor all-gathered at every forward, and get no gradient buffers; only trainable ones are flattened and
sharded. This holds inside mixed blocks too (``freeze=lora``: frozen weights beside trainable adapters), with
``use_orig_params=True``.
"""

from __future__ import annotations

from torch import nn


def block_classes(backbone: nn.Module) -> set[type[nn.Module]]:
    """The classes of a backbone's repeated units: ViT blocks (timm ``EvaBlock`` for DINOv3) or ConvNeXt stages."""
    model = getattr(backbone, "model", backbone)
    units = getattr(model, "blocks", None)
    if units is None:
        units = getattr(model, "stages", None)
    if units is None:
        raise ValueError(f"{type(model).__name__} has neither `blocks` nor `stages` to wrap with FSDP")
    return {type(unit) for unit in units}


def fsdp_strategy(module: nn.Module, sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "full",
                  ignore_frozen: bool = True, activation_checkpointing: bool = False, **kwargs):
    """``FSDPStrategy`` for a ``DenseTask``: every backbone block one FSDP unit, the head in the root unit.

    Args:
        module: the task (its ``backbone`` gives the block classes; its frozen parts are ignored).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD`` (within a node).
        state_dict_type: ``full`` (one checkpoint file written by rank 0, what export.py and predict.py read) or
            ``sharded`` (a folder with one file per rank: faster to write for huge trainable parts).
        ignore_frozen: keep frozen tensors out of FSDP (each process holds them whole, no communication); false
            shards them too (less memory per GPU, an all-gather per block and forward).
        activation_checkpointing: recompute each block's activations in the backward pass (memory for time).
        kwargs: further ``FSDPStrategy`` / ``FullyShardedDataParallel`` arguments.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    blocks = block_classes(module.backbone)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    return FSDPStrategy(auto_wrap_policy=blocks, sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                        ignored_states=frozen if ignore_frozen and frozen else None, use_orig_params=True,
                        activation_checkpointing_policy=blocks if activation_checkpointing else None, **kwargs)
