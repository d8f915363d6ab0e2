"""The interface between the training loop (:mod:`.loop`) and the stage recipes (:mod:`.stages`).

A stage recipe turns a :class:`~masqclip_cli.training.config.TrainConfig` into one or more :class:`Phase` objects
(what to optimise, how one step computes its losses, where the phase writes) and hands each to the ``run_phase``
callable it is given, which is the loop; the loop returns a :class:`TrainResult`. The recipe never sees the
optimiser, the checkpoint, the signals or the logs; the loop never knows what a stage computes. :class:`Runtime`
describes the processes (rank, device) to both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.training.data import TrainDataset, TrainSample

__all__ = ["FINAL", "Phase", "RunPhase", "Runtime", "StepFn", "TrainResult"]

#: The model file a phase writes into its folder.
FINAL = "final.safetensors"

#: One step: ``(forward module — the DDP-wrapped :attr:`Phase.forward` —, this process's samples, iteration,
#: global index of the first sample)`` → losses; ``"total"`` is back-propagated, the rest is logged.
StepFn = Callable[[nn.Module, list[TrainSample], int, int], dict[str, Tensor]]


@dataclass
class Runtime:
    """This process in the (possibly distributed) run: rank, world size, local rank, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # the process group was created by train() (and is destroyed by it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@dataclass
class TrainResult:
    """What a run produced: the final model file, the iterations run in this call and the last logged losses."""

    final: Path
    iterations_run: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_iteration: float | None = None


@dataclass
class Phase:
    """One optimisation run (the teacher, one distillation round, or MasQ-tuning) as a stage recipe describes it.

    Attributes:
        name: the phase's name (logs, progress, and the checkpoint's phase check).
        folder: where ``checkpoint.pt``, ``metrics.jsonl`` and ``final.safetensors`` go.
        model: the whole model, saved as ``final.safetensors`` at the end.
        trainable: the module whose parameters that require a gradient are optimised; its state_dict (without
            ``visual.*``, the frozen CLIP) is what the checkpoint holds; in train mode during the run.
        step: computes one step's losses (:data:`StepFn`).
        data: the training samples.
        forward: the module the step calls, wrapped in DistributedDataParallel under torchrun; its parameters that
            require a gradient must be those of ``trainable`` (None: ``trainable`` itself).
        backbone_prefix: names under ``trainable`` that get ``lr × backbone_lr_multiplier``.
        evaluate: the periodic evaluation, ``iteration → metrics`` (None: no evaluation).
        save_extra: stored under ``extra.training`` of the final model file.
    """

    name: str
    folder: Path
    model: MasQCLIP
    trainable: nn.Module
    step: StepFn
    data: TrainDataset
    forward: nn.Module | None = None
    backbone_prefix: str = "backbone."
    evaluate: Callable[[int], dict[str, Any]] | None = None
    save_extra: dict[str, Any] = field(default_factory=dict)


#: The loop as a stage recipe sees it: run one phase, return what it produced.
RunPhase = Callable[[Phase], TrainResult]
