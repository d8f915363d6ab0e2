"""Training data: ground-truth masks of any dataset ``masqclip eval`` reads, seeded augmentation, and a stateless,
process-count-independent batch order.

Every training sample has a global *position* ``p`` (0, 1, 2, ... across iterations): iteration ``i`` with global
batch ``B`` holds positions ``i·B … i·B + B − 1``, and rank ``r`` of ``W`` processes takes the contiguous slice
``i·B + r·B/W …``. Position ``p`` is image ``order(epoch)[p mod N]`` with ``epoch = p // N`` and ``order(epoch)`` a
permutation seeded by ``(seed, epoch)``; its augmentation is seeded by ``(seed, epoch, index)``. So the data of a
step depends only on ``(seed, iteration)``: a resumed run needs no loader state and 1 or 8 processes see the same
global batch.

Targets: :func:`masqclip_cli.data.targets.sample_targets` (re-exported here): panoptic datasets give one mask per
non-crowd segment (its class = the segment's class); instance datasets one per non-crowd annotation; semantic datasets
one per class present (ignore pixels are in no mask). Classes are contiguous indices into the dataset vocabulary.

Augmentation (:class:`AugmentConfig`, METHOD.md §3.2):

* ``fixed`` (the official COCO-panoptic recipe): horizontal flip (p = 0.5), then resize to ``size × size``
  (aspect ratio not kept; bilinear for the image, nearest for masks);
* ``lsj`` (Mask2Former large-scale jitter, the official COCO-instance recipe): flip, resize so that the image fits
  ``s·size × s·size`` with ``s ~ U(min_scale, max_scale)`` (aspect ratio kept), then a random ``size × size`` crop
  when larger. A smaller image is not padded here: the batch is zero-padded in normalised space (≈ the mean colour,
  where detectron2 pads with 128 before normalising);
* ``none``: the image as stored.

Masks left empty by a crop are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from masqclip_cli.data.datasets import DatasetError, EvalDataset
from masqclip_cli.data.targets import instance_annotations, sample_targets
from masqclip_cli.io.sources import SkipItem, SourceItem, decode_item

__all__ = [
    "AugmentConfig",
    "TrainDataset",
    "TrainSample",
    "batch_positions",
    "pad_masks",
    "sample_targets",
]

AUGMENT_MODES = ("fixed", "lsj", "none")
logger = logging.getLogger("masqclip")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (see the module docstring).

    Attributes:
        mode: ``fixed``, ``lsj`` or ``none``.
        size: output side (``fixed``) or crop side / scale reference (``lsj``); 1024 in the official recipes.
        flip: random horizontal flip with probability 0.5.
        min_scale, max_scale: the ``lsj`` scale range (0.1, 2.0).
    """

    mode: str = "fixed"
    size: int = 1024
    flip: bool = True
    min_scale: float = 0.1
    max_scale: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in AUGMENT_MODES:
            raise ValueError(f"augment mode must be one of {', '.join(AUGMENT_MODES)}, got {self.mode!r}")
        if int(self.size) < 32:
            raise ValueError(f"augment size must be at least 32, got {self.size}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")


@dataclass
class TrainSample:
    """One augmented training image.

    Attributes:
        image: ``(3, H, W)`` uint8 RGB.
        masks: ``(G, H, W)`` bool ground-truth masks (G may be 0).
        classes: ``(G,)`` int64 contiguous class indices into the dataset vocabulary.
        id: the dataset sample id.
        position: the global sample position (see the module docstring).
    """

    image: Tensor
    masks: Tensor
    classes: Tensor
    id: str
    position: int


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def augment(image: np.ndarray, masks: np.ndarray, config: AugmentConfig, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``config`` to ``image`` ``(H, W, 3)`` uint8 and ``masks`` ``(G, H, W)`` bool with ``rng``; returns the
    new pair (masks left empty are kept here; :class:`TrainDataset` drops them)."""
    flip = bool(config.flip and rng.random() < 0.5)
    if config.mode == "lsj":
        scale = float(rng.uniform(config.min_scale, config.max_scale))
        off_y, off_x = float(rng.random()), float(rng.random())
    if flip:
        image = image[:, ::-1]
        masks = masks[:, :, ::-1]
    h, w = image.shape[:2]
    if config.mode == "none":
        return np.ascontiguousarray(image), np.ascontiguousarray(masks)
    if config.mode == "fixed":
        nh = nw = int(config.size)
    else:
        target = scale * config.size
        ratio = min(target / h, target / w)
        nh, nw = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.BILINEAR))
    if masks.shape[0]:
        resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(masks)).float()[None], size=(nh, nw),
                                mode="nearest")[0]
        masks = resized.numpy() > 0.5
    else:
        masks = np.zeros((0, nh, nw), dtype=bool)
    if config.mode == "lsj" and (nh > config.size or nw > config.size):
        y0 = int(round((max(nh - config.size, 0)) * off_y))
        x0 = int(round((max(nw - config.size, 0)) * off_x))
        image = image[y0: y0 + config.size, x0: x0 + config.size]
        masks = masks[:, y0: y0 + config.size, x0: x0 + config.size]
    return np.ascontiguousarray(image), np.ascontiguousarray(masks)


class TrainDataset:
    """An :class:`EvalDataset` as training data: :meth:`sample_at` gives the augmented sample of a global position.

    Args:
        dataset: any dataset ``load_dataset`` reads.
        augment: the augmentation.
        seed: the data seed (order and augmentation).
        class_map: optional ``(num_dataset_classes,)`` int64 map from dataset class indices to training class
            indices, -1 to drop a class's masks (a base-only vocabulary).
    """

    def __init__(self, dataset: EvalDataset, augment: AugmentConfig, seed: int = 0,
                 class_map: np.ndarray | None = None) -> None:
        if len(dataset) == 0:
            raise DatasetError(f"dataset {dataset.name} has no samples")
        self.dataset = dataset
        self.augment = augment
        self.seed = int(seed)
        self.class_map = None if class_map is None else np.asarray(class_map, dtype=np.int64)
        self._order_epoch = -1
        self._order: np.ndarray | None = None
        self._instances: dict[str, list[dict]] | None = None
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of sample indices of an epoch (seeded by ``(seed, epoch)``)."""
        if epoch != self._order_epoch:
            self._order = _rng(self.seed, 0, epoch).permutation(len(self.dataset))
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def _annotations(self) -> dict[str, list[dict]] | None:
        if self.dataset.task != "instance":
            return None
        if self._instances is None:
            self._instances = instance_annotations(self.dataset)
        return self._instances

    def load(self, index: int, epoch: int) -> TrainSample:
        """The augmented sample ``index`` of the dataset in ``epoch`` (position field -1)."""
        sample = self.dataset.samples[index]
        try:
            rgb = decode_item(SourceItem(sample.id, sample.image_path)).rgb
        except SkipItem as exc:
            raise DatasetError(str(exc)) from None
        masks, classes = sample_targets(self.dataset, sample, self._annotations())
        if masks.shape[1:] != rgb.shape[:2]:
            raise DatasetError(f"{sample.image_path}: image is {rgb.shape[0]}x{rgb.shape[1]} but its ground truth "
                               f"{masks.shape[1]}x{masks.shape[2]}")
        if self.class_map is not None and classes.size:
            classes = self.class_map[classes]
            keep = classes >= 0
            masks, classes = masks[keep], classes[keep]
        image, masks = augment(rgb, masks, self.augment, _rng(self.seed, 1, epoch, index))
        keep = masks.reshape(masks.shape[0], -1).any(axis=1) if masks.shape[0] else np.zeros(0, dtype=bool)
        return TrainSample(
            image=torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).contiguous(),
            masks=torch.from_numpy(np.require(masks[keep], requirements=["C", "W"])),
            classes=torch.from_numpy(classes[keep]),
            id=sample.id,
            position=-1,
        )

    def sample_at(self, position: int) -> TrainSample:
        """The sample at a global position. An unreadable sample is replaced by the next one of the epoch's order
        (deterministically) and its id recorded in :attr:`skipped`; a dataset with no readable sample raises."""
        n = len(self.dataset)
        epoch, k = divmod(int(position), n)
        order = self.order(epoch)
        first_error: DatasetError | None = None
        for step in range(n):
            index = int(order[(k + step) % n])
            try:
                out = self.load(index, epoch)
            except DatasetError as exc:
                sample_id = self.dataset.samples[index].id
                if sample_id not in self.skipped:
                    logger.warning("skipping training image %s: %s", sample_id, exc)
                self.skipped.add(sample_id)
                first_error = first_error or exc
                continue
            out.position = int(position)
            return out
        raise DatasetError(f"dataset {self.dataset.name}: no sample could be read (first error: {first_error})")

    # torch DataLoader protocol (indices are global positions)
    def __getitem__(self, position: int) -> TrainSample:
        return self.sample_at(position)


def batch_positions(iteration: int, global_batch: int, rank: int = 0, world: int = 1) -> list[int]:
    """The global positions of this rank's share of an iteration's batch (see the module docstring)."""
    if global_batch % world:
        raise ValueError(f"the batch size {global_batch} is not divisible by the {world} processes")
    local = global_batch // world
    start = iteration * global_batch + rank * local
    return list(range(start, start + local))


def _identity_collate(batch: list[TrainSample]) -> list[TrainSample]:
    return batch


class _PositionBatches(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int, global_batch: int, rank: int, world: int) -> None:
        self.start, self.stop = start, stop
        self.global_batch, self.rank, self.world = global_batch, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for iteration in range(self.start, self.stop):
            yield batch_positions(iteration, self.global_batch, self.rank, self.world)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def iterate_batches(data: TrainDataset, start: int, stop: int, global_batch: int, rank: int = 0, world: int = 1,
                    workers: int = 0) -> Iterator[tuple[int, list[TrainSample]]]:
    """``(iteration, samples)`` for iterations ``start … stop − 1`` of this rank, decoded by ``workers`` loader
    processes (0: in this process). The loader uses its own RNG, never the global one."""
    loader: Any = torch.utils.data.DataLoader(
        data,
        batch_sampler=_PositionBatches(start, stop, global_batch, rank, world),
        num_workers=int(workers),
        collate_fn=_identity_collate,
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=2 if workers else None,
    )
    yield from zip(range(start, stop), loader, strict=False)


def pad_masks(masks: list[Tensor], size: tuple[int, int]) -> list[Tensor]:
    """Zero-pad every ``(G_i, H_i, W_i)`` mask stack bottom/right to ``size`` ``(Hp, Wp)`` (the batch's padded
    frame)."""
    out = []
    for m in masks:
        padded = torch.zeros((m.shape[0], *size), dtype=m.dtype, device=m.device)
        padded[:, : m.shape[1], : m.shape[2]] = m
        out.append(padded)
    return out
