"""The stage recipes of ``masqclip train`` (METHOD.md §1.1, §1.6, §2, §3): how each stage builds its model and data
and what one of its steps computes. The loop that runs them is :mod:`.loop`; the interface is :mod:`.phase`.

* ``proposals`` — the class-agnostic teacher: :class:`SetCriterion` on every ground-truth segment as "object";
* ``distill`` — progressive distillation: for each of ``rounds`` rounds a student starts from the teacher and trains
  on ground truth ∪ the frozen teacher's confident masks that overlap no ground truth (:func:`pseudo_targets`,
  :func:`~masqclip_cli.training.distill.select_pseudo_masks`); then the student becomes the teacher;
* ``masq`` — MasQ-tuning: the proposal network frozen (eval mode), CLIP frozen except f_Q′ (or the ``tune``
  ablation's weights) and the mask position embedding; the step runs the model's own forward (proposals → attention
  masks → MasQ visual → classifier) with gradients through the MasQ visual; labels by Dice > 0.6 at the CLIP input
  resolution (:func:`~masqclip_cli.evaluation.matching.assign_labels`), weighted NLL (:func:`masq_loss`).

Each recipe is ``recipe(config, runtime, run_phase) -> TrainResult`` (:data:`RECIPES`): it builds one
:class:`~masqclip_cli.training.phase.Phase` per optimisation run and lets ``run_phase`` (the loop) run it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from masqclip_cli.data.datasets import EvalDataset, load_dataset
from masqclip_cli.evaluation.matching import assign_labels
from masqclip_cli.evaluation.proposals import proposal_recall
from masqclip_cli.evaluation.runner import EvalOptions, evaluate
from masqclip_cli.inference.postprocess import PostprocessConfig
from masqclip_cli.modeling.clip_loader import create_open_clip, get_tokenizer
from masqclip_cli.modeling.factory import (
    MODEL_REGISTRY,
    TINY_CLIP_CONFIG,
    load_model,
    resolve_proposal_config,
)
from masqclip_cli.modeling.masq_visual import MasQVisual
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.modeling.proposals.backbone import load_torchvision_resnet
from masqclip_cli.modeling.proposals.network import build_proposal_network
from masqclip_cli.modeling.text import TextEncoder
from masqclip_cli.training.config import ConfigError, TrainConfig
from masqclip_cli.training.data import AugmentConfig, TrainDataset, TrainSample, pad_masks
from masqclip_cli.training.distill import select_pseudo_masks, teacher_instance_scores
from masqclip_cli.training.losses import SetCriterion, masq_loss
from masqclip_cli.training.matcher import HungarianMatcher, make_generator
from masqclip_cli.training.phase import FINAL, Phase, RunPhase, Runtime, TrainResult
from masqclip_cli.vocab import Vocabulary, read_templates

__all__ = ["OFFICIAL_CLIP", "RECIPES", "attach_clip", "class_map", "proposals_model", "pseudo_targets",
           "train_distill", "train_masq", "train_proposals"]

logger = logging.getLogger("masqclip")

#: The CLIP the published models use; the default of ``--clip``.
OFFICIAL_CLIP = ("ViT-L-14-336-quickgelu", "openai")
_DISTILL_SALT = 0x6D617371  # separates the pseudo-label point draws from the loss's draws


# ------------------------------------------------------------------------------------------------ models
def _clip_spec(config: TrainConfig) -> tuple[Any, str | None]:
    """(open_clip model name or config dict, pretrained) from ``--clip`` / ``--clip-weights``."""
    if config.clip is None:
        return OFFICIAL_CLIP[0], config.clip_weights or OFFICIAL_CLIP[1]
    if config.clip == "tiny":
        return TINY_CLIP_CONFIG, config.clip_weights
    if isinstance(config.clip, str) and config.clip.endswith(".json") and Path(config.clip).is_file():
        try:
            return json.loads(Path(config.clip).read_text()), config.clip_weights
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config.clip}: not a JSON open_clip config ({exc})") from None
    return config.clip, config.clip_weights


def attach_clip(model: MasQCLIP | None, proposals: nn.Module, proposals_config: dict, config: TrainConfig,
                tune: str = "q") -> MasQCLIP:
    """A MasQCLIP with ``proposals`` and a fresh MasQ visual (``fq_init``, ``tune``) on the configured CLIP, or on
    ``model``'s CLIP when no ``--clip`` is given and a model is."""
    if model is not None and config.clip is None:
        clip_visual, text_encoder, spec = model.masq.visual, model.text_encoder, model.clip_spec
    else:
        name, pretrained = _clip_spec(config)
        try:
            clip, spec = create_open_clip(name, pretrained)
        except Exception as exc:  # noqa: BLE001 - one line for every loading failure
            raise ConfigError(f"cannot load the CLIP for the model file ({name}, {pretrained}): {exc}; pass "
                              "clip=NAME and clip_weights=TAG|FILE (or clip=tiny for a tiny random one)") from None
        clip_visual = clip.visual
        text_encoder = TextEncoder(clip, get_tokenizer(spec), spec.weights_id)
    masq = MasQVisual(clip_visual, fq_init=config.fq_init, tune=tune)
    if config.tie_mask_embeddings:
        with torch.no_grad():
            masq.mask_pos_embed.copy_(masq.visual.positional_embedding[0])
        masq.mask_pos_embed.requires_grad_(False)
    thresholds = model.thresholds if model is not None else None
    return MasQCLIP(proposals, masq, text_encoder, proposals_config=proposals_config, clip_spec=spec,
                    thresholds=thresholds).eval()


def _load_file(path: str, what: str) -> MasQCLIP:
    if not Path(path).is_file() and path not in MODEL_REGISTRY:
        raise ConfigError(f"{path}: {what} model file not found")
    try:
        return load_model(path)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{path}: cannot load the {what} model ({exc})") from None


def proposals_model(config: TrainConfig) -> MasQCLIP:
    """The proposals stage's starting model: ``--init``'s network or a fresh ``--proposals`` one (seeded), the
    ``--backbone-weights`` loaded, on the configured CLIP."""
    torch.manual_seed(config.seed)
    if config.init:
        base = _load_file(config.init, "initial")
        network, proposals_config = base.proposals, base.proposals_config
    else:
        base = None
        try:
            proposals_config = _resolve_proposals(config.proposals)
            network = build_proposal_network(proposals_config)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"proposals: {exc}") from None
    if config.backbone_weights:
        _load_backbone(network, config.backbone_weights)
    return attach_clip(base, network, proposals_config, config)


def _resolve_proposals(value: Any) -> dict:
    if isinstance(value, str) and value.endswith(".json") and Path(value).is_file():
        return json.loads(Path(value).read_text())
    return resolve_proposal_config(value)


def _load_backbone(network: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: backbone weights file not found")
    try:
        if p.suffix == ".safetensors":
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        unused = load_torchvision_resnet(network.backbone, state)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ConfigError(f"{path}: cannot load the backbone weights ({exc})") from None
    logger.info("backbone from %s (%d unused tensors)", path, len(unused))


# ------------------------------------------------------------------------------------------------ data
def _dataset(config: TrainConfig, eval_set: bool = False) -> EvalDataset:
    if eval_set:
        name, root = config.eval_dataset, config.eval_root or config.root
        opts: dict[str, Any] = {"split": config.eval_split or "val"} if name == "synthetic" else {}
    else:
        name, root = config.dataset, config.root
        opts = {k: getattr(config, k) for k in ("images", "panoptic_json", "panoptic_dir", "annotations", "labels",
                                                   "vocab")}
        if name == "synthetic":
            opts["split"] = config.split or "train"
    try:
        return load_dataset(name, root, **opts)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def class_map(dataset: EvalDataset, classes: str) -> tuple[Vocabulary, np.ndarray | None]:
    """The training vocabulary and the dataset → training class map (base classes only when the dataset has a
    base/novel split and ``classes`` is auto or base)."""
    if classes == "all" or dataset.novel is None:
        if classes == "base" and dataset.novel is None:
            raise ConfigError(f"classes=base: dataset {dataset.name} defines no base/novel split")
        return dataset.vocabulary, None
    keep = [i for i in range(len(dataset.vocabulary)) if i not in dataset.novel]
    mapping = np.full(len(dataset.vocabulary), -1, dtype=np.int64)
    mapping[keep] = np.arange(len(keep))
    vocab = Vocabulary([dataset.vocabulary.classes[i] for i in keep])
    return vocab, mapping


def _train_data(config: TrainConfig) -> tuple[TrainDataset, Vocabulary]:
    dataset = _dataset(config)
    vocab, mapping = class_map(dataset, config.classes)
    augment = AugmentConfig(config.augment, config.size, config.flip, config.min_scale, config.max_scale)
    return TrainDataset(dataset, augment, config.seed, mapping), vocab


def _batch(model: MasQCLIP, samples: list[TrainSample], device: torch.device
           ) -> tuple[Tensor, list[Tensor], list[Tensor], list[tuple[int, int]]]:
    """(normalised padded images (B, 3, Hp, Wp), GT masks padded to (Hp, Wp) per image, classes, image sizes)."""
    images = [s.image.to(device) for s in samples]
    normalized = model.proposals.normalize_and_pad(images)
    size = tuple(normalized.shape[-2:])
    masks = pad_masks([s.masks.to(device) for s in samples], size)  # type: ignore[arg-type]
    classes = [s.classes.to(device) for s in samples]
    return normalized, masks, classes, [tuple(s.image.shape[1:]) for s in samples]  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ evaluation
def _proposal_evaluator(config: TrainConfig, model: MasQCLIP) -> Callable[[int], dict] | None:
    if not config.eval_dataset:
        return None
    dataset = _dataset(config, eval_set=True)

    def run(iteration: int) -> dict[str, Any]:
        return {"proposals": proposal_recall(model.proposals, dataset, limit=config.eval_limit)}

    return run


def _masq_evaluator(config: TrainConfig, model: MasQCLIP, templates: list[str] | None
                    ) -> Callable[[int], dict] | None:
    if not config.eval_dataset:
        return None
    dataset = _dataset(config, eval_set=True)
    tasks = dataset.tasks() if config.eval_tasks == "auto" else tuple(
        t.strip() for t in config.eval_tasks.split(",") if t.strip() and t.strip() != "proposals")

    def run(iteration: int) -> dict[str, Any]:
        bank, vocab = model.text_embeddings, model.vocabulary
        model.set_vocabulary(dataset.vocabulary, templates=templates)
        try:
            t = model.thresholds
            postprocess = PostprocessConfig(tasks=tuple(tasks), object_mask_threshold=float(t["object_mask_threshold"]),
                                            overlap_threshold=float(t["overlap_threshold"]),
                                            detections_per_image=int(t["detections_per_image"]))
            report = evaluate(dataset, EvalOptions(tasks=tuple(tasks), postprocess=postprocess,
                                                   limit=config.eval_limit), model=model)
        finally:
            model.set_text_embeddings(bank, vocab)
        metrics = {task: _summary(values) for task, values in report["metrics"].items()}
        if config.eval_tasks == "auto" or "proposals" in config.eval_tasks:
            metrics["proposals"] = proposal_recall(model.proposals, dataset, limit=config.eval_limit)
        return metrics

    return run


def _summary(values: Any) -> Any:
    """Metrics without their per-class tables (the log keeps the headline numbers)."""
    if isinstance(values, dict):
        return {k: _summary(v) for k, v in values.items() if k not in ("per_class", "classes")}
    return values


# ------------------------------------------------------------------------------------------------ proposals, distill
class _ProposalForward(nn.Module):
    """The proposal network as a module DDP can wrap: returns a plain dict of tensors."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> dict[str, Any]:
        out = self.network(images)
        return {"pred_logits": out.pred_logits, "pred_masks": out.pred_masks, "aux_outputs": out.aux}


@torch.no_grad()
def pseudo_targets(teacher: nn.Module, images: Tensor, gt_masks: list[Tensor], sizes: list[tuple[int, int]], *,
                   config: TrainConfig, iteration: int, sample_offset: int) -> tuple[list[Tensor], list[int]]:
    """Ground truth ∪ the teacher's kept masks per image (METHOD.md §2), all at the padded frame ``(Hp, Wp)``;
    also the number of pseudo masks added per image. Teacher masks are upsampled bilinearly to the padded frame and
    cut to the image (no mask outside it)."""
    out = teacher(images)
    hp, wp = images.shape[-2:]
    targets, added = [], []
    for b, gt in enumerate(gt_masks):
        h, w = sizes[b]
        logits = F.interpolate(out.pred_masks[b:b + 1].float(), size=(hp, wp), mode="bilinear",
                               align_corners=False)[0][:, :h, :w]
        scores, masks = teacher_instance_scores(out.pred_logits[b], logits)
        generator = make_generator(config.seed ^ _DISTILL_SALT, iteration, sample_offset + b, images.device)
        kept = select_pseudo_masks(scores, masks, gt[:, :h, :w].bool(), score_threshold=config.score_threshold,
                                   overlap_threshold=config.overlap_threshold, overlap=config.overlap,
                                   num_points=config.num_points, generator=generator)
        extra = torch.zeros((kept.numel(), hp, wp), dtype=gt.dtype, device=gt.device)
        extra[:, :h, :w] = masks[kept].to(gt.dtype)
        targets.append(torch.cat([gt, extra]))
        added.append(int(kept.numel()))
    return targets, added


def _criterion(config: TrainConfig) -> SetCriterion:
    matcher = HungarianMatcher(config.class_weight, config.mask_weight, config.dice_weight, config.num_points)
    return SetCriterion(matcher, class_weight=config.class_weight, mask_weight=config.mask_weight,
                        dice_weight=config.dice_weight, no_object_weight=config.no_object_weight,
                        num_points=config.num_points, oversample_ratio=config.oversample_ratio,
                        importance_sample_ratio=config.importance_sample_ratio)


def _proposal_phase(config: TrainConfig, env: Runtime, *, name: str, folder: Path, model: MasQCLIP,
                    teacher: MasQCLIP | None = None, save_extra: dict[str, Any]) -> Phase:
    """Train ``model``'s proposal network with :class:`SetCriterion`, on ground truth alone or (``teacher``) on
    ground truth ∪ the frozen teacher's pseudo masks."""
    data, _ = _train_data(config)
    criterion = _criterion(config)
    model.to(env.device)
    if teacher is not None:
        teacher.to(env.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    for p in model.masq.parameters():
        p.requires_grad_(False)
    for p in model.proposals.parameters():
        p.requires_grad_(True)
    if config.precision == "fp64":
        model.proposals.double()
        if teacher is not None:
            teacher.proposals.double()
    dtype = next(model.proposals.parameters()).dtype
    forward = _ProposalForward(model.proposals)

    def step(wrapped: nn.Module, samples: list[TrainSample], iteration: int, offset: int) -> dict[str, Tensor]:
        images, masks, _, sizes = _batch(model, samples, env.device)
        images = images.to(dtype)
        targets = masks
        if teacher is not None:
            targets, added = pseudo_targets(teacher.proposals, images, masks, sizes, config=config,
                                            iteration=iteration, sample_offset=offset)
        outputs = wrapped(images)
        losses = criterion(outputs, targets, config.seed, iteration, offset)
        if teacher is not None:
            losses["pseudo_masks"] = torch.tensor(float(sum(added)) / max(len(samples), 1))
        return losses

    return Phase(name=name, folder=folder, model=model, trainable=forward, step=step, data=data,
                 backbone_prefix="network.backbone.", evaluate=_proposal_evaluator(config, model),
                 save_extra=save_extra)


def train_proposals(config: TrainConfig, env: Runtime, run_phase: RunPhase) -> TrainResult:
    """The ``proposals`` stage: one phase training a class-agnostic proposal network on ground truth."""
    model = proposals_model(config)
    return run_phase(_proposal_phase(config, env, name="proposals", folder=Path(config.out), model=model,
                                     save_extra={"stage": "proposals"}))


def train_distill(config: TrainConfig, env: Runtime, run_phase: RunPhase) -> TrainResult:
    """The ``distill`` stage: ``rounds`` phases (``round-{r}/``), each student trained against the previous round's
    model as the teacher; the last round's model is copied to ``final.safetensors``."""
    out = Path(config.out)
    teacher_path = config.teacher
    result = None
    for r in range(1, config.rounds + 1):
        folder = out / f"round-{r}"
        if env.main:
            folder.mkdir(parents=True, exist_ok=True)
        env.barrier()
        teacher = _load_file(teacher_path, "teacher")
        student = _load_file(teacher_path, "teacher")  # θ ← μ
        if config.clip is not None:
            student = attach_clip(None, student.proposals, student.proposals_config, config)
        torch.manual_seed(config.seed + r)
        result = run_phase(_proposal_phase(
            config, env, name=f"distill-round-{r}", folder=folder, model=student, teacher=teacher,
            save_extra={"stage": "distill", "round": r, "teacher": str(teacher_path)}))
        teacher_path = str(result.final)
        del teacher, student
    assert result is not None
    if env.main:
        tmp = out / f".{FINAL}.tmp"
        shutil.copyfile(result.final, tmp)
        os.replace(tmp, out / FINAL)
    env.barrier()
    result.final = out / FINAL
    return result


# ------------------------------------------------------------------------------------------------ masq
class _MasQForward(nn.Module):
    """MasQCLIP's own batched forward (proposals → attention masks → MasQ visual → classifier) as a module that DDP
    can wrap, with gradients (the model's ``forward`` runs under ``no_grad`` and pads each image on its own; this is
    the batch forward it runs per padded size, called with the training batch's common padded size).

    Its only submodule is the MasQ visual, so DDP synchronises exactly the parameters the optimiser trains; the rest
    of the model is reached through the model's method, not as a submodule. Returns ``(mask logits (B, Q, Hp/4,
    Wp/4), log p_clip (B, Q, N+1))``.
    """

    def __init__(self, model: MasQCLIP) -> None:
        super().__init__()
        self.masq = model.masq
        self._forward_padded = model.forward_padded  # a bound method: a plain attribute, not a submodule

    def forward(self, images: list[Tensor], padded: tuple[int, int]) -> tuple[Tensor, Tensor]:
        outputs = self._forward_padded(images, padded, False)
        return (torch.stack([o.mask_logits for o in outputs]), torch.stack([o.clip_log_probs for o in outputs]))


def train_masq(config: TrainConfig, env: Runtime, run_phase: RunPhase) -> TrainResult:
    """The ``masq`` stage: one phase tuning the MasQ visual (``tune``) on top of ``--init``'s frozen proposals."""
    base = _load_file(config.init, "proposals")  # type: ignore[arg-type]
    torch.manual_seed(config.seed)
    model = attach_clip(base, base.proposals, base.proposals_config, config, tune=config.tune)
    if model.text_encoder is None:
        raise ConfigError(f"{config.init}: has no CLIP text tower; give clip and clip_weights")
    data, vocab = _train_data(config)
    templates = read_templates(config.templates) if config.templates else None
    model.set_vocabulary(vocab, templates=templates)
    model.to(env.device)
    for p in model.proposals.parameters():
        p.requires_grad_(False)
    masq = model.masq
    model.proposals.eval()
    num_classes = len(vocab)
    forward = _MasQForward(model)

    def step(wrapped: nn.Module, samples: list[TrainSample], iteration: int, offset: int) -> dict[str, Tensor]:
        images = [s.image for s in samples]
        padded = model.padded_size(max(im.shape[1] for im in images), max(im.shape[2] for im in images))
        masks = pad_masks([s.masks.to(env.device) for s in samples], padded)
        classes = [s.classes.to(env.device) for s in samples]
        mask_logits, log_probs = wrapped(images, padded)
        labels = torch.stack([assign_labels(mask_logits[b], masks[b], classes[b], num_classes, masq.image_size,
                                            config.assign_threshold) for b in range(len(samples))])
        loss = masq_loss(log_probs, labels, config.background_weight, config.masq_weight)
        foreground = (labels < num_classes).float().mean()
        accuracy = ((log_probs.argmax(-1) == labels) & (labels < num_classes)).float().sum() / \
            (labels < num_classes).float().sum().clamp(min=1)
        return {"total": loss, "loss_masq": loss.detach(), "foreground": foreground, "label_accuracy": accuracy}

    return run_phase(Phase(name="masq", folder=Path(config.out), model=model, trainable=masq, forward=forward,
                           step=step, data=data, backbone_prefix="backbone.",
                           evaluate=_masq_evaluator(config, model, templates),
                           save_extra={"stage": "masq", "proposals": str(config.init), "tune": config.tune}))


#: Stage name → recipe.
RECIPES: dict[str, Callable[[TrainConfig, Runtime, RunPhase], TrainResult]] = {
    "proposals": train_proposals,
    "distill": train_distill,
    "masq": train_masq,
}
