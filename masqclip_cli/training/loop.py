"""``masqclip train``: one training loop for the three stages of MasQCLIP (METHOD.md §1.1, §1.6, §2, §3).

* ``proposals`` — the class-agnostic teacher: :class:`SetCriterion` on every ground-truth segment as "object";
* ``distill`` — progressive distillation: for each of ``rounds`` rounds a student starts from the teacher and trains
  on ground truth ∪ the frozen teacher's confident masks that overlap no ground truth (:func:`select_pseudo_masks`);
  then the student becomes the teacher;
* ``masq`` — MasQ-tuning: the proposal network frozen (eval mode), CLIP frozen except f_Q′ (or the ``tune``
  ablation's weights) and the mask position embedding; labels by Dice > 0.6 at the CLIP input resolution
  (:func:`assign_labels`), weighted NLL (:func:`masq_loss`).

Infrastructure: ``torchrun`` DistributedDataParallel (gloo on CPU, NCCL on CUDA) with the global batch split over
processes and every random draw seeded per (seed, iteration, sample) so that 1 and N processes compute the same
step; AMP on CUDA; AdamW with the backbone at lr × 0.1 and no weight decay on norms and embeddings; full-model
gradient clipping; a step schedule computed from the iteration alone; ``checkpoint.pt`` every N iterations with
exact resume (weights, optimiser, scaler, RNG; the data position is the iteration); ``final.safetensors`` in our
model format; periodic evaluation; a JSONL metrics log and a rich progress display.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from masqclip_cli.data.datasets import EvalDataset, load_dataset
from masqclip_cli.modeling.classifier import classify
from masqclip_cli.modeling.clip_loader import create_open_clip, get_tokenizer
from masqclip_cli.modeling.factory import MODEL_REGISTRY, TINY_CLIP_CONFIG, load_model, save_model
from masqclip_cli.modeling.masq_visual import MasQVisual
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.modeling.proposals.backbone import load_torchvision_resnet
from masqclip_cli.modeling.proposals.network import build_proposal_network
from masqclip_cli.modeling.text import TextEncoder
from masqclip_cli.training.config import ConfigError, TrainConfig
from masqclip_cli.training.data import AugmentConfig, TrainDataset, TrainSample, iterate_batches, pad_masks
from masqclip_cli.training.distill import select_pseudo_masks, teacher_instance_scores
from masqclip_cli.training.losses import SetCriterion, assign_labels, masq_loss
from masqclip_cli.training.matcher import HungarianMatcher, make_generator
from masqclip_cli.vocab import Vocabulary, read_templates

__all__ = ["TrainResult", "lr_factor", "param_groups", "train"]

logger = logging.getLogger("masqclip")

CHECKPOINT = "checkpoint.pt"
FINAL = "final.safetensors"
METRICS = "metrics.jsonl"
#: The CLIP the published models use; the default of ``--clip``.
OFFICIAL_CLIP = ("ViT-L-14-336-quickgelu", "openai")
_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d)
_EMBEDDING_NAMES = ("query_feat", "query_embed", "level_embed", "mask_pos_embed", "positional_embedding",
                    "class_embedding")
_DISTILL_SALT = 0x6D617371  # separates the pseudo-label point draws from the loss's draws


@dataclass
class TrainResult:
    """What a run produced: the final model file, the iterations run in this call and the last logged losses."""

    final: Path
    iterations_run: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_iteration: float | None = None


# ------------------------------------------------------------------------------------------------ optimiser
def lr_factor(iteration: int, steps: list[float], total: int, gamma: float) -> float:
    """The multiplier of the base lr at ``iteration``: ``gamma ** (number of milestones <= iteration)``; a milestone
    below 1 is a fraction of ``total`` iterations (rounded), else an iteration number."""
    milestones = [int(round(s * total)) if s < 1 else int(s) for s in steps]
    return float(gamma) ** sum(iteration >= m for m in milestones)


def param_groups(module: nn.Module, lr: float, weight_decay: float, backbone_multiplier: float = 1.0,
                 backbone_prefix: str = "backbone.") -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters of ``module`` (the detectron2 / Mask2Former rules):
    parameters under ``backbone_prefix`` get ``lr × backbone_multiplier``; parameters of normalisation layers and
    embeddings (``nn.Embedding``, query/level/position embeddings) get no weight decay."""
    no_decay: set[int] = set()
    for _name, mod in module.named_modules():
        if isinstance(mod, (*_NORM_TYPES, nn.Embedding)):
            no_decay.update(id(p) for p in mod.parameters(recurse=False))
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if id(param) in no_decay or name.split(".")[-1] in _EMBEDDING_NAMES \
            or any(n in name for n in ("query_feat", "query_embed", "level_embed")) else weight_decay
        rate = lr * backbone_multiplier if name.startswith(backbone_prefix) else lr
        groups.setdefault((rate, decay), []).append(param)
    return [{"params": ps, "lr": rate, "initial_lr": rate, "weight_decay": decay}
            for (rate, decay), ps in groups.items()]


# ------------------------------------------------------------------------------------------------ distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup(config: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = config.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if world <= 1:
        return _Dist(device=torch.device(wanted))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if wanted.startswith("cuda") else "gloo"
        if wanted.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        owns = True
    device = torch.device(f"cuda:{local_rank}") if wanted.startswith("cuda") else torch.device("cpu")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


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


def _attach_clip(model: MasQCLIP | None, proposals: nn.Module, proposals_config: dict, config: TrainConfig,
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
                              "--clip NAME --clip-weights TAG|FILE (or --clip tiny for a tiny random one)") from None
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


def _proposals_model(config: TrainConfig) -> MasQCLIP:
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
            raise ConfigError(f"--proposals: {exc}") from None
    if config.backbone_weights:
        _load_backbone(network, config.backbone_weights)
    return _attach_clip(base, network, proposals_config, config)


def _resolve_proposals(value: Any) -> dict:
    from masqclip_cli.modeling.factory import resolve_proposal_config

    if isinstance(value, str) and value.endswith(".json") and Path(value).is_file():
        return json.loads(Path(value).read_text())
    return resolve_proposal_config(value)


def _load_backbone(network: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: backbone weights file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

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


def _class_map(dataset: EvalDataset, classes: str) -> tuple[Vocabulary, np.ndarray | None]:
    """The training vocabulary and the dataset → training class map (base classes only when the dataset has a
    base/novel split and ``classes`` is auto or base)."""
    if classes == "all" or dataset.novel is None:
        if classes == "base" and dataset.novel is None:
            raise ConfigError(f"--classes base: dataset {dataset.name} defines no base/novel split")
        return dataset.vocabulary, None
    keep = [i for i in range(len(dataset.vocabulary)) if i not in dataset.novel]
    mapping = np.full(len(dataset.vocabulary), -1, dtype=np.int64)
    mapping[keep] = np.arange(len(keep))
    vocab = Vocabulary([dataset.vocabulary.classes[i] for i in keep])
    return vocab, mapping


def _batch(model: MasQCLIP, samples: list[TrainSample], device: torch.device
           ) -> tuple[Tensor, list[Tensor], list[Tensor], list[tuple[int, int]]]:
    """(normalised padded images (B, 3, Hp, Wp), GT masks padded to (Hp, Wp) per image, classes, image sizes)."""
    images = [s.image.to(device) for s in samples]
    normalized = model.proposals.normalize_and_pad(images)
    size = tuple(normalized.shape[-2:])
    masks = pad_masks([s.masks.to(device) for s in samples], size)  # type: ignore[arg-type]
    classes = [s.classes.to(device) for s in samples]
    return normalized, masks, classes, [tuple(s.image.shape[1:]) for s in samples]  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ steps
class _ProposalForward(nn.Module):
    """The proposal network as a module DDP can wrap: returns a plain dict of tensors."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> dict[str, Any]:
        out = self.network(images)
        return {"pred_logits": out.pred_logits, "pred_masks": out.pred_masks, "aux_outputs": out.aux}


@torch.no_grad()
def pseudo_targets(teacher: nn.Module, images: Tensor, gt_masks: list[Tensor], sizes: list[tuple[int, int]],
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
        kept = select_pseudo_masks(scores, masks, gt[:, :h, :w].bool(), config.score_threshold,
                                   config.overlap_threshold, config.overlap, config.num_points, generator)
        extra = torch.zeros((kept.numel(), hp, wp), dtype=gt.dtype, device=gt.device)
        extra[:, :h, :w] = masks[kept].to(gt.dtype)
        targets.append(torch.cat([gt, extra]))
        added.append(int(kept.numel()))
    return targets, added


# ------------------------------------------------------------------------------------------------ the loop
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_RESUME_KEYS = ("stage", "seed", "batch_size", "dataset", "split", "augment", "size", "lr", "tune", "proposals",
                "rounds", "classes")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rewrite_metrics(path: Path, completed: int) -> None:
    """Drop log lines of iterations a resumed run will redo (written after the checkpoint of ``completed``
    iterations it resumes from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= completed:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


class _Phase:
    """One optimisation run (the teacher, one distillation round, or MasQ-tuning) writing into ``folder``."""

    def __init__(self, config: TrainConfig, env: _Dist, folder: Path, model: MasQCLIP, trainable: nn.Module,
                 step: Callable[[nn.Module, list[TrainSample], int, int], dict[str, Tensor]],
                 data: TrainDataset, name: str, evaluate: Callable[[int], dict[str, Any]] | None,
                 backbone_prefix: str, save_extra: dict[str, Any], console: Any = None) -> None:
        self.config, self.env, self.folder, self.model = config, env, folder, model
        self.trainable, self.step_fn, self.data, self.name = trainable, step, data, name
        self.evaluate, self.save_extra, self.console = evaluate, save_extra, console
        self.on_step: Callable[[str, int], None] | None = None
        self.groups = param_groups(trainable, config.lr, config.weight_decay, config.backbone_lr_multiplier,
                                   backbone_prefix)
        if not self.groups:
            raise ConfigError("nothing to train: no parameter requires a gradient")
        self.params = [p for g in self.groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(self.groups, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, config.lr_steps, config.iterations, config.lr_gamma))
        amp = config.amp
        if amp == "auto":
            amp = "fp16" if env.device.type == "cuda" and config.precision == "fp32" else "off"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and env.device.type == "cuda")
        self.wrapped: nn.Module = trainable
        if env.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                trainable, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                broadcast_buffers=False)

    # --- checkpoints
    def _trainable_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.trainable.state_dict().items() if not k.startswith("visual.")}

    def save_checkpoint(self, iteration: int) -> None:
        if not self.env.main:
            return
        state = {
            "format": "masqclip-train-checkpoint/1",
            "phase": self.name,
            "iteration": iteration,
            "model": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "config": {k: getattr(self.config, k) for k in _RESUME_KEYS},
        }
        _atomic_torch_save(state, self.folder / CHECKPOINT)

    def load_checkpoint(self) -> int:
        path = self.folder / CHECKPOINT
        if not (self.config.resume and path.exists()):
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{path}: cannot read the checkpoint ({exc}); delete it or use --no-resume") from None
        if state.get("phase") != self.name:
            raise ConfigError(f"{path}: is a checkpoint of '{state.get('phase')}', not '{self.name}'")
        saved = state.get("config", {})
        changed = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(self.config, k)]
        if changed:
            k = changed[0]
            raise ConfigError(f"{path}: made with {k}={saved[k]!r}, now {k}={getattr(self.config, k)!r}; use another "
                              "--out, or --no-resume to start over")
        missing, unexpected = self.trainable.load_state_dict(state["model"], strict=False)
        unexpected = [k for k in unexpected if not k.startswith("visual.")]
        missing = [k for k in missing if not k.startswith("visual.")]
        if missing or unexpected:
            raise ConfigError(f"{path}: does not fit the model ({(missing + unexpected)[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        return int(state["iteration"])

    # --- the loop
    def run(self) -> TrainResult:
        with _StopOnSignal() as stop:
            return self._run(stop)

    def _run(self, stop: _StopOnSignal) -> TrainResult:
        config, env = self.config, self.env
        final = self.folder / FINAL
        start = self.load_checkpoint()
        result = TrainResult(final=final)
        if start >= config.iterations and final.exists():
            return result
        if env.main:
            _rewrite_metrics(self.folder / METRICS, start)
        local = config.batch_size // env.world
        log_sums: dict[str, float] = {}
        log_count, t_data, t_step = 0, 0.0, 0.0
        progress, task = self._progress(start)
        self.trainable.train()
        t_last = time.perf_counter()
        batches = iterate_batches(self.data, start, config.iterations, config.batch_size, env.rank, env.world,
                                  config.workers)
        run_start = time.perf_counter()
        for iteration, samples in batches:
            t0 = time.perf_counter()
            t_data += t0 - t_last
            with torch.autocast(env.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                losses = self.step_fn(self.wrapped, samples, iteration, env.rank * local)
            total = losses["total"]
            if not torch.isfinite(total):
                raise FloatingPointError(f"{self.name}: the loss is {total.item()} at iteration {iteration}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, config.clip_gradient) \
                if config.clip_gradient > 0 else _grad_norm(self.params)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            t_last = time.perf_counter()
            t_step += t_last - t0
            for k, v in losses.items():
                if k == "total" or "_" not in k or not k[-1].isdigit():
                    log_sums[k] = log_sums.get(k, 0.0) + float(v.detach() if isinstance(v, Tensor) else v)
            log_sums["grad_norm"] = log_sums.get("grad_norm", 0.0) + float(grad_norm)
            log_count += 1
            done = iteration + 1
            if done % config.log_every == 0 or done == config.iterations:
                means = self._reduce({k: v / log_count for k, v in log_sums.items()})
                lr = config.lr * lr_factor(iteration, config.lr_steps, config.iterations, config.lr_gamma)
                record = {"iteration": done, "phase": self.name, "lr": lr, **means,
                          "data_seconds": t_data / log_count, "step_seconds": t_step / log_count}
                result.last_losses = means
                self._log(record)
                if progress is not None:
                    progress.update(task, completed=done, loss=means.get("total", float("nan")))
                log_sums, log_count, t_data, t_step = {}, 0, 0.0, 0.0
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.iterations:
                self.save_checkpoint(done)
            if self.evaluate and config.eval_every and done % config.eval_every == 0 and done < config.iterations:
                result.evaluations.append(self._evaluate(done))
            result.iterations_run += 1
            if progress is not None and done % config.log_every:
                progress.update(task, completed=done)
            if self.on_step is not None:
                self.on_step(self.name, done)
            if self._stop_requested(stop) and done < config.iterations:
                if progress is not None:
                    progress.stop()
                self.save_checkpoint(done)
                env.barrier()
                raise KeyboardInterrupt(f"{self.name}: stopped after iteration {done}; checkpoint saved, run the "
                                        "same command again to resume")
        if result.iterations_run:
            result.seconds_per_iteration = (time.perf_counter() - run_start) / result.iterations_run
        if progress is not None:
            progress.stop()
        self.trainable.eval()
        self.save_checkpoint(config.iterations)
        if self.evaluate:
            result.evaluations.append(self._evaluate(config.iterations))
        if env.main:
            extra = {"training": {**self.save_extra, "phase": self.name, "iterations": config.iterations,
                                  "config": config.to_json()}}
            self.model.float()  # model files are float32 (fp64 runs are checks)
            save_model(self.model, final, extra=extra)
        env.barrier()
        return result

    def _stop_requested(self, stop: _StopOnSignal) -> bool:
        """Whether any process was interrupted (all processes agree, so they stop at the same iteration)."""
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.env.device)
        if self.env.world > 1:
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if self.env.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t)
        return {k: float(v) / self.env.world for k, v in zip(keys, t.tolist())}

    def _log(self, record: dict[str, Any]) -> None:
        if not self.env.main:
            return
        with open(self.folder / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _evaluate(self, iteration: int) -> dict[str, Any]:
        was = self.trainable.training
        self.trainable.eval()
        t0 = time.perf_counter()
        metrics = self.evaluate(iteration) if self.evaluate else {}
        self.trainable.train(was)
        record = {"iteration": iteration, "phase": self.name, "eval": metrics,
                  "eval_seconds": time.perf_counter() - t0}
        self._log(record)
        return record

    def _progress(self, start: int) -> tuple[Any, Any]:
        if not self.env.main or self.console is None:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=self.console,
                            transient=False)
        task = progress.add_task(self.name, total=self.config.iterations, completed=start, loss=float("nan"))
        progress.start()
        return progress, task


class _StopOnSignal:
    """While active, SIGINT / SIGTERM only set :attr:`requested`: the loop finishes the current step, saves a
    checkpoint and stops (a second SIGINT interrupts at once). Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _grad_norm(params: list[nn.Parameter]) -> Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


# ------------------------------------------------------------------------------------------------ stages
def _criterion(config: TrainConfig) -> SetCriterion:
    matcher = HungarianMatcher(config.class_weight, config.mask_weight, config.dice_weight, config.num_points)
    return SetCriterion(matcher, config.class_weight, config.mask_weight, config.dice_weight,
                        config.no_object_weight, config.num_points, config.oversample_ratio,
                        config.importance_sample_ratio)


def _proposal_evaluator(config: TrainConfig, model: MasQCLIP, env: _Dist) -> Callable[[int], dict] | None:
    if not config.eval_dataset:
        return None
    from masqclip_cli.evaluation.proposals import proposal_recall

    dataset = _dataset(config, eval_set=True)

    def run(iteration: int) -> dict[str, Any]:
        return {"proposals": proposal_recall(model.proposals, dataset, limit=config.eval_limit)}

    return run


def _masq_evaluator(config: TrainConfig, model: MasQCLIP, env: _Dist, templates: list[str] | None
                    ) -> Callable[[int], dict] | None:
    if not config.eval_dataset:
        return None
    from masqclip_cli.evaluation.runner import EvalOptions, evaluate
    from masqclip_cli.inference.postprocess import PostprocessConfig

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
            from masqclip_cli.evaluation.proposals import proposal_recall

            metrics["proposals"] = proposal_recall(model.proposals, dataset, limit=config.eval_limit)
        return metrics

    return run


def _summary(values: Any) -> Any:
    """Metrics without their per-class tables (the log keeps the headline numbers)."""
    if isinstance(values, dict):
        return {k: _summary(v) for k, v in values.items() if k not in ("per_class", "classes")}
    return values


def _write_config(config: TrainConfig, folder: Path, env: _Dist) -> None:
    if env.main:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".config.json.tmp"
        tmp.write_text(json.dumps(config.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "config.json")
    env.barrier()


def _train_data(config: TrainConfig) -> tuple[TrainDataset, Vocabulary]:
    dataset = _dataset(config)
    vocab, mapping = _class_map(dataset, config.classes)
    augment = AugmentConfig(config.augment, config.size, config.flip, config.min_scale, config.max_scale)
    return TrainDataset(dataset, augment, config.seed, mapping), vocab


def _run_proposal_phase(config: TrainConfig, env: _Dist, folder: Path, model: MasQCLIP,
                        teacher: MasQCLIP | None, name: str, extra: dict[str, Any], console: Any,
                        on_step: Any = None) -> TrainResult:
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
    pseudo_counts = {"n": 0}

    def step(wrapped: nn.Module, samples: list[TrainSample], iteration: int, offset: int) -> dict[str, Tensor]:
        images, masks, _, sizes = _batch(model, samples, env.device)
        images = images.to(dtype)
        targets = masks
        if teacher is not None:
            targets, added = pseudo_targets(teacher.proposals, images, masks, sizes, config, iteration, offset)
            pseudo_counts["n"] += sum(added)
        outputs = wrapped(images)
        losses = criterion(outputs, targets, config.seed, iteration, offset)
        if teacher is not None:
            losses["pseudo_masks"] = torch.tensor(float(sum(added)) / max(len(samples), 1))
        return losses

    phase = _Phase(config, env, folder, model, forward, step, data, name,
                   _proposal_evaluator(config, model, env), "network.backbone.", extra, console)
    phase.on_step = on_step
    return phase.run()


def _train_proposals(config: TrainConfig, env: _Dist, console: Any, on_step: Any = None) -> TrainResult:
    out = Path(config.out)
    _write_config(config, out, env)
    model = _proposals_model(config)
    return _run_proposal_phase(config, env, out, model, None, "proposals", {"stage": "proposals"}, console, on_step)


def _train_distill(config: TrainConfig, env: _Dist, console: Any, on_step: Any = None) -> TrainResult:
    out = Path(config.out)
    _write_config(config, out, env)
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
            student = _attach_clip(None, student.proposals, student.proposals_config, config)
        torch.manual_seed(config.seed + r)
        result = _run_proposal_phase(config, env, folder, student, teacher, f"distill-round-{r}",
                                     {"stage": "distill", "round": r, "teacher": str(teacher_path)}, console,
                                     on_step)
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


def _train_masq(config: TrainConfig, env: _Dist, console: Any, on_step: Any = None) -> TrainResult:
    out = Path(config.out)
    _write_config(config, out, env)
    base = _load_file(config.init, "proposals")  # type: ignore[arg-type]
    torch.manual_seed(config.seed)
    model = _attach_clip(base, base.proposals, base.proposals_config, config, tune=config.tune)
    if model.text_encoder is None:
        raise ConfigError(f"{config.init}: has no CLIP text tower; pass --clip and --clip-weights")
    data, vocab = _train_data(config)
    templates = read_templates(config.templates) if config.templates else None
    model.set_vocabulary(vocab, templates=templates)
    model.to(env.device)
    for p in model.proposals.parameters():
        p.requires_grad_(False)
    masq = model.masq
    model.proposals.eval()
    num_classes = len(vocab)

    def step(wrapped: nn.Module, samples: list[TrainSample], iteration: int, offset: int) -> dict[str, Tensor]:
        images, masks, classes, sizes = _batch(model, samples, env.device)
        hp, wp = images.shape[-2:]
        with torch.no_grad():
            proposals = model.proposals(images.to(next(model.proposals.parameters()).dtype))
            mask_logits = proposals.pred_masks.float()
            raw = torch.zeros(len(samples), 3, hp, wp, device=env.device)
            for i, s in enumerate(samples):
                raw[i, :, : s.image.shape[1], : s.image.shape[2]] = s.image.to(env.device).float()
            pixels = masq.preprocess(raw)
            allowed = masq.attention_masks(mask_logits)
        embeddings = wrapped(pixels, allowed).float()
        scores = classify(embeddings, model.text_embeddings, None, model.logit_scale)
        labels = torch.stack([assign_labels(mask_logits[b], masks[b], classes[b], num_classes, masq.image_size,
                                            config.assign_threshold) for b in range(len(samples))])
        loss = masq_loss(scores.log_probs, labels, config.background_weight, config.masq_weight)
        foreground = (labels < num_classes).float().mean()
        accuracy = ((scores.log_probs.argmax(-1) == labels) & (labels < num_classes)).float().sum() / \
            (labels < num_classes).float().sum().clamp(min=1)
        return {"total": loss, "loss_masq": loss.detach(), "foreground": foreground, "label_accuracy": accuracy}

    phase = _Phase(config, env, out, model, masq, step, data, "masq", _masq_evaluator(config, model, env, templates),
                   "backbone.", {"stage": "masq", "proposals": str(config.init), "tune": config.tune}, console)
    phase.on_step = on_step
    return phase.run()


def train(config: TrainConfig, console: Any = None,
          on_step: Callable[[str, int], None] | None = None) -> TrainResult:
    """Run a training stage as configured (see the module docstring); returns where the final model is.

    Args:
        config: the settings (:func:`~masqclip_cli.training.config.load_config`).
        console: a rich Console for the progress display (None: no display).
        on_step: called with ``(phase name, iterations done)`` after every step.

    Under ``torchrun`` every process calls this; the process group is created here (and destroyed at the end) unless
    the caller made it. SIGINT / SIGTERM stop after the current step with a checkpoint saved and raise
    KeyboardInterrupt; running the same command again resumes.
    """
    env = _setup(config)
    if config.batch_size % env.world:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {env.world} processes")
    try:
        runner = {"proposals": _train_proposals, "distill": _train_distill, "masq": _train_masq}[config.stage]
        return runner(config, env, console, on_step)
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()
