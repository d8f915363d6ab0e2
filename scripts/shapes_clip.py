"""Contrastive pre-training of a small CLIP for the synthetic shapes world (the demo model's CLIP).

A script-side module, not part of the installed package: only the demo recipe uses it
(``scripts/build_demo_model.py``, ``scripts/train_shapes_clip.py``, which import it from this folder).

No pretrained CLIP can be downloaded on the project's machines, so the demo model's CLIP is trained here from
scratch on the image-text pairs of :mod:`masqclip_cli.data.synthetic`: the 64x64 object and stuff crops with their
captions (``"a photo of a red star"``, ``"a photo of the sky"``) and the whole scenes with their scene captions
(``"a red star and two blue circles on grass under the sky"``). Captions name every category, base and novel, as web
alt-texts name things no segmentation dataset annotates, so novel categories are learned by CLIP and only by CLIP.

The model is open_clip's own ``CLIP`` class built from a config dict (:data:`SHAPES_CLIP_CONFIG`) through
:func:`masqclip_cli.modeling.clip_loader.create_open_clip`, with the official traits MasQ relies on (ViT with a class
token, ``quick_gelu``, ``head_width = width / heads``) and open_clip's BPE tokenizer (vocabulary 49408). It is saved
as a plain open_clip state_dict (safetensors or ``.pt``) with its config next to it (``<name>.json``), so::

    cfg = json.load(open("shapes-clip.json"))
    clip, spec = create_open_clip(cfg, "shapes-clip.safetensors")

rebuilds it exactly (see :func:`load_shapes_clip`).

Training: symmetric InfoNCE with a learnable logit scale (CLIP's), AdamW (no weight decay on gains, biases,
embeddings' norms and the logit scale, as open_clip), linear warmup then cosine decay, seeded, CPU. Two choices go
beyond the plain recipe, both on by default and both recorded in the report:

* **caption augmentation** — each time a crop is drawn its caption is used whole or shortened by dropping words:
  the colour (``"a photo of a star"``), the ``"a photo of"`` prefix (``"red star"``) or both (``"star"``). Web
  alt-texts range from sentences to bare nouns; here it is what makes bare class names, MasQCLIP's default prompts,
  work. Scene captions are used as they are.
* **duplicate-aware targets** — two items of a batch with the same caption text are both positives of each other
  (the InfoNCE target is uniform over them) instead of being pushed apart as negatives; with a small closed world
  the same caption recurs in nearly every batch.

Images go through the same pixel path as MasQ's CLIP input (``/255``, bicubic resize without antialias to the tower's
size, OpenAI mean/std), so a whole scene looks to CLIP exactly as it will inside :class:`MasQVisual`. Crops get a
random zoom (area 0.6-1) and horizontal flips, scenes flips only; colours are never jittered (captions name them).

Zero-shot evaluation (:func:`zero_shot_eval`) classifies held-out crops among all 20 categories with each prompt set
(``"a photo of a {name}."`` and bare names): accuracy overall, base, novel and per category; chance is 1/20.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masqclip_cli.data.synthetic import DEFAULT_NOVEL, STUFF_NAMES, SYNTH_CATEGORIES, SynthConfig, generate
from masqclip_cli.modeling.clip_loader import create_open_clip, get_tokenizer, tensor_digest
from masqclip_cli.modeling.masq_visual import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from masqclip_cli.modeling.text import encode_text_trimmed

__all__ = [
    "CATEGORY_NAMES",
    "EVAL_TEMPLATES",
    "SHAPES_CLIP_CONFIG",
    "ShapesData",
    "TrainConfig",
    "caption_variants",
    "clip_input",
    "crop_colour",
    "ensure_split",
    "load_shapes_clip",
    "load_split",
    "save_clip",
    "semantic_positives",
    "sidecar_path",
    "train_clip",
    "zero_shot_eval",
]

#: The shapes-world CLIP: a 64x64-input ViT with 8x8 patches (an 8x8 grid, 65 tokens), a 3-layer text transformer
#: with open_clip's BPE vocabulary and a 40-token context (the longest scene caption is 39 tokens with start/end).
#: About 4.2M parameters, 3.2M of them the token embedding that the 49408-token vocabulary needs.
SHAPES_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}

#: Category names in id order (things, then stuff), the zero-shot classes.
CATEGORY_NAMES: tuple[str, ...] = tuple(c["name"] for c in SYNTH_CATEGORIES)

#: Prompt sets of the zero-shot evaluation: name -> template (``{}`` = the class name).
EVAL_TEMPLATES: dict[str, str] = {"photo": "a photo of a {}.", "bare": "{}"}

_CROP_CAPTION = re.compile(r"^a photo of (?:(?:a|an) (?P<color>[a-z]+) (?P<thing>.+)|(?P<stuff>.+))$")


# --- data ---------------------------------------------------------------------------------------------------------


def caption_variants(caption: str, category: str) -> list[str]:
    """The captions a crop may be shown with: the caption, then shortened forms (see the module docstring).

    ``"a photo of a red star"`` -> ``["a photo of a red star", "a photo of a star", "red star", "star"]``;
    ``"a photo of the sky"`` -> ``["a photo of the sky", "the sky", "sky"]``. Duplicates are removed, order kept.
    """
    m = _CROP_CAPTION.match(caption)
    out = [caption]
    if m and m.group("thing") == category:
        color, name = m.group("color"), m.group("thing")
        article = "an" if name[0] in "aeiou" else "a"
        out += [f"a photo of {article} {name}", f"{color} {name}", name]
    elif m and m.group("stuff"):
        out += [m.group("stuff"), category]
    else:
        out.append(category)
    return list(dict.fromkeys(out))


def clip_input(images: Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
               std: Sequence[float] = OPENAI_CLIP_STD) -> Tensor:
    """uint8 ``(B, 3, H, W)`` RGB -> float CLIP input ``(B, 3, size, size)``: exactly MasQVisual.preprocess
    (``/255``, bicubic squash without antialias, ``(x - mean) / std``)."""
    x = images.to(torch.float32) / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


@dataclass
class ShapesData:
    """Image-text pairs of one split, images already at the CLIP input size (resized as MasQ does; uint8).

    Attributes:
        images: ``(N, 3, R, R)`` uint8: the crops, then the scenes.
        captions: per item, its caption variants (the first is the generator's caption).
        categories: per item, the crop's category, or None for a scene.
        scene_categories: per item, the categories named in a scene's caption (empty for crops).
        n_crops: the number of crops (items ``[0, n_crops)``).
    """

    images: Tensor
    captions: list[list[str]]
    categories: list[str | None]
    scene_categories: list[list[str]]
    n_crops: int

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def n_scenes(self) -> int:
        return len(self) - self.n_crops


def ensure_split(data_dir: str | Path, split: str, images: int | None, seed: int,
                 size: tuple[int, int] = (256, 256), novel: Sequence[str] = DEFAULT_NOVEL,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Make sure ``data_dir`` holds ``split`` with crops; draw it with :func:`generate` when absent.

    An existing split is used as it is when ``images`` is None or matches what it was drawn with; a split drawn with
    another image count or seed is an error (use another folder). Returns the split's config from ``meta.json``.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    existing = None
    if meta_path.is_file() and (data_dir / f"crops_{split}.jsonl").is_file():
        existing = json.loads(meta_path.read_text(encoding="utf-8")).get("splits", {}).get(split)
    if existing is not None:
        if images is not None and (existing.get("images") != images or existing.get("seed") != seed):
            raise ValueError(
                f"{data_dir}: split '{split}' was drawn with images={existing.get('images')} seed="
                f"{existing.get('seed')}, not images={images} seed={seed}; use another --data folder"
            )
        return existing
    if images is None:
        raise ValueError(f"{data_dir}: no split '{split}' with crops, and no image count to draw one")
    if log:
        log(f"drawing {images} synthetic images into {data_dir} (split {split}, seed {seed})")
    generate(data_dir, SynthConfig(images=images, seed=seed, split=split, size=tuple(size), novel=tuple(novel)))
    return json.loads(meta_path.read_text(encoding="utf-8"))["splits"][split]


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot read image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _to_size(arrays: list[np.ndarray], size: int, chunk: int = 256) -> Tensor:
    out = []
    for start in range(0, len(arrays), chunk):
        x = torch.from_numpy(np.stack(arrays[start : start + chunk])).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def _named_in(caption: str) -> list[str]:
    text = f" {caption} "
    found = []
    for name in CATEGORY_NAMES:
        forms = [name] if name in STUFF_NAMES else [name, name + "s", name + "es"]
        if any(f" {f} " in text or f" {f}," in text for f in forms):
            found.append(name)
    return found


def load_split(data_dir: str | Path, split: str, image_size: int, scenes: bool = True,
               max_items: int | None = None) -> ShapesData:
    """The crops (and scenes) of a generated split with their captions, resized to ``image_size``."""
    data_dir = Path(data_dir)
    rows = [json.loads(line) for line in (data_dir / f"crops_{split}.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if max_items is not None:
        rows = rows[:max_items]
    arrays = [_read_rgb(data_dir / f"crops_{split}" / r["crop"]) for r in rows]
    captions = [caption_variants(r["caption"], r["category"]) for r in rows]
    categories: list[str | None] = [r["category"] for r in rows]
    named: list[list[str]] = [[] for _ in rows]
    n_crops = len(rows)
    if scenes:
        scene_rows = [json.loads(line) for line in
                      (data_dir / f"captions_{split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        for r in scene_rows:
            arrays.append(_read_rgb(data_dir / "images" / split / r["image"]))
            captions.append([r["caption"]])
            categories.append(None)
            named.append(_named_in(r["caption"]))
    crops = _to_size(arrays[:n_crops], image_size)
    whole = _to_size(arrays[n_crops:], image_size)
    return ShapesData(torch.cat([crops, whole]), captions, categories, named, n_crops)


# --- training -----------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How :func:`train_clip` trains.

    Attributes:
        steps: optimiser steps; None: ``epochs`` passes over the items.
        epochs: passes over the items when ``steps`` is None.
        batch_size: items per step.
        lr, weight_decay, warmup, min_lr_ratio: AdamW, linear warmup over ``warmup`` of the steps, cosine decay to
            ``min_lr_ratio * lr``.
        seed: seeds the initialisation, the order of items, the caption variants and the augmentation.
        time_budget: seconds for the training loop (None: no limit). The schedule then runs on the larger of the
            fractions of steps done and of the budget spent, so warmup and cosine decay complete within the budget
            however fast the machine is (CPU time on a shared machine varies), and the loop stops when it is spent.
        caption_aug: draw crop captions among their shortened variants (else the caption only).
        dedup_targets: items with the same caption text are positives of each other.
        crop_zoom: smallest area fraction of the random zoom of crops (1 = none).
        flip: random horizontal flips.
        log_every: loss curve points (and log lines) every this many steps.
        eval_every: with a ``validate`` callback, score the model every this many steps (and at the end); the
            returned model is the best-scoring one (0: never; the last step's model is returned).
        patience: stop when this many validations in a row did not beat the best score (None: run all steps).
        semantic_targets: an image and a text of the batch are positives whenever the text is true of the image:
            equal captions, and a crop caption naming only a crop's class (``"star"``, ``"a photo of a star"``) or
            its class and colour (``"red star"``) is true of every crop of that class (and colour) in the batch,
            not only of the crop it was drawn for; without it, the shortened captions of two star crops push each
            other's images apart.
        checkpoint_every: with a ``checkpoint`` path, save the whole training state (model, optimiser, random
            generator, data order, curve, best model) every this many steps, so that a killed run resumes there.
    """

    steps: int | None = None
    epochs: float = 10.0
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.05
    min_lr_ratio: float = 0.05
    seed: int = 0
    time_budget: float | None = None
    caption_aug: bool = True
    dedup_targets: bool = True
    crop_zoom: float = 0.6
    flip: bool = True
    log_every: int = 10
    variant_weights: tuple[float, ...] = field(default=(0.4, 0.2, 0.2, 0.2))
    eval_every: int = 0
    patience: int | None = None
    checkpoint_every: int = 0
    semantic_targets: bool = False


def _lr_at(progress: float, cfg: TrainConfig) -> float:
    """Learning rate at a fraction of the run: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if progress < cfg.warmup:
        return cfg.lr * progress / cfg.warmup
    t = min(1.0, (progress - cfg.warmup) / max(1e-9, 1 - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's split: no decay on 1-d tensors (gains, biases, class/positional vectors), norms, logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _augment(x: Tensor, is_crop: Tensor, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Random zoom (crops) and horizontal flip (all) of a float batch, one affine resampling."""
    b = x.shape[0]
    if not cfg.flip and (cfg.crop_zoom >= 1.0 or not bool(is_crop.any())):
        return x
    side = torch.ones(b)
    if cfg.crop_zoom < 1.0:
        area = cfg.crop_zoom + (1 - cfg.crop_zoom) * torch.rand(b, generator=gen)
        side = torch.where(is_crop, area.sqrt(), side)
    room = 1 - side
    tx = (torch.rand(b, generator=gen) * 2 - 1) * room
    ty = (torch.rand(b, generator=gen) * 2 - 1) * room
    sx = side.clone()
    if cfg.flip:
        sx = torch.where(torch.rand(b, generator=gen) < 0.5, -sx, sx)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, side, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                     text_ids: Tensor | None = None, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of L2-normalised features ``(B, D)``; with ``text_ids`` ``(B,)`` items of equal id are
    all positives; with ``positives`` ``(B, B)`` bool (image i, text j; the diagonal set), the image-to-text targets
    of image i are uniform over its row and the text-to-image targets of text j over its column."""
    logits = logit_scale.exp() * image_features @ text_features.t()
    if positives is not None:
        pos = positives.float()
        return (F.cross_entropy(logits, pos / pos.sum(dim=1, keepdim=True))
                + F.cross_entropy(logits.t(), pos.t() / pos.t().sum(dim=1, keepdim=True))) / 2
    if text_ids is None:
        labels = torch.arange(logits.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    pos = (text_ids[:, None] == text_ids[None, :]).float()
    targets = pos / pos.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def crop_colour(caption: str) -> str | None:
    """The colour a thing crop's caption names (``"a photo of a red star"`` -> ``"red"``), else None."""
    m = _CROP_CAPTION.match(caption)
    return m.group("color") if m and m.group("thing") else None


def semantic_positives(texts: Sequence[str], categories: Sequence[str | None], colours: Sequence[str | None]
                       ) -> Tensor:
    """``(B, B)`` bool: text j is true of image i (see ``TrainConfig.semantic_targets``).

    Args:
        texts: the caption drawn for each item.
        categories: each item's crop class (None for a whole scene).
        colours: each item's crop colour (None for stuff and scenes).
    """
    def ids(values: Sequence[str | None]) -> Tensor:
        index: dict[str, int] = {}
        return torch.tensor([-1 if v is None else index.setdefault(v, len(index)) for v in values])

    text, category, colour = ids(texts), ids(categories), ids(colours)
    names_colour = torch.tensor([c is not None and c in t.split() for t, c in zip(texts, colours)])
    same_text = text[:, None] == text[None, :]
    same_class = (category[:, None] == category[None, :]) & (category[None, :] >= 0)
    colour_ok = ~names_colour[None, :] | (colour[:, None] == colour[None, :])
    return same_text | (same_class & colour_ok)


class _Tokens:
    """Cached open_clip tokenisation of the (few) distinct caption texts."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor]):
        self.tokenizer = tokenizer
        self.cache: dict[str, Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


#: TrainConfig fields that do not change the trained weights: a run may resume with other values of these.
_BOOKKEEPING_FIELDS = ("eval_every", "patience", "checkpoint_every", "log_every")


def _trajectory(train_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_config.items() if k not in _BOOKKEEPING_FIELDS}


def train_clip(
    data: ShapesData,
    clip_config: dict[str, Any] | None = None,
    cfg: TrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    validate: Callable[[nn.Module, Any], float] | None = None,
    checkpoint: str | Path | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Train a CLIP contrastively on ``data``.

    Args:
        validate: scores a model in eval mode, given it and its spec (higher is better), called every
            ``cfg.eval_every`` steps and at the end; the best-scoring model is returned (the validation curve and
            the chosen step go into the record).
        checkpoint: a file for the whole training state, written atomically every ``cfg.checkpoint_every`` steps;
            when it exists at the start, training resumes from it (same data and config: the result equals an
            uninterrupted run's), and it is removed when training ends.

    Returns:
        (model in eval mode, its ClipSpec from :func:`create_open_clip`, a training record: steps, loss curve
        ``[{"step", "loss", "lr", "logit_scale", "seconds"}]``, first/last losses, items seen, seconds, and with
        ``validate`` the validation curve ``[{"step", "score"}]`` and ``best_step``).
    """
    clip_config = copy.deepcopy(clip_config or SHAPES_CLIP_CONFIG)
    cfg = cfg or TrainConfig()
    if len(data) < 2:
        raise ValueError("need at least two image-text pairs to train")
    torch.manual_seed(cfg.seed)
    model, spec = create_open_clip(clip_config, None)
    tokens = _Tokens(get_tokenizer(spec))
    size = spec.image_size
    if data.images.shape[-1] != size:
        raise ValueError(f"data images are {data.images.shape[-1]} px, the CLIP input is {size} px")
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(data)
    batch = min(cfg.batch_size, n)
    per_epoch = max(1, n // batch)
    total = cfg.steps if cfg.steps is not None else max(1, int(math.ceil(cfg.epochs * per_epoch)))
    is_crop_all = torch.arange(n) < data.n_crops
    weights = torch.tensor(cfg.variant_weights, dtype=torch.float64)
    colours = [crop_colour(c[0]) if i < data.n_crops else None for i, c in enumerate(data.captions)]

    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    validation: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "step": 0, "state": None}
    order = torch.randperm(n, generator=gen)
    cursor = 0
    step = 0
    spent = 0.0  # training seconds of earlier sittings (a resumed run)
    window: list[float] = []
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        same_run = _trajectory(state["train_config"]) == _trajectory(asdict(cfg))
        if state["items"] != n or state["total"] != total or not same_run:
            raise ValueError(f"{checkpoint}: a checkpoint of another CLIP training run (other data or config); "
                             "delete it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        order, cursor, step, spent = state["order"], state["cursor"], state["step"], state["seconds"]
        curve, losses, validation, best, window = (state["curve"], state["losses"], state["validation"],
                                                   state["best"], state["window"])
        if log:
            log(f"resumed CLIP training at step {step}/{total} from {checkpoint}")

    def save_checkpoint() -> None:
        state = {"items": n, "total": total, "train_config": asdict(cfg), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "generator": gen.get_state(), "order": order, "cursor": cursor,
                 "step": step, "seconds": spent + time.perf_counter() - start, "curve": curve, "losses": losses,
                 "validation": validation, "best": best, "window": window}
        tmp = checkpoint.with_name(checkpoint.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint)

    def run_validation() -> bool:
        """Score the model now; True when it is the best so far."""
        model.eval()
        score = float(validate(model, spec))
        model.train()
        validation.append({"step": step, "score": round(score, 5)})
        improved = best["score"] is None or score > best["score"]
        if improved:
            best.update(score=score, step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        if log:
            log(f"validation at step {step}: {score:.4f} (best {best['score']:.4f} at step {best['step']})")
        return improved

    start = time.perf_counter()
    stopped_by_budget = False
    stopped_by_patience = False
    lr = _lr_at(min(1.0, (step + 1) / total), cfg)
    while step < total:
        elapsed = spent + time.perf_counter() - start
        if cfg.time_budget is not None and elapsed >= cfg.time_budget:
            stopped_by_budget = True
            if log:
                log(f"time budget spent after {step} steps")
            break
        progress = (step + 1) / total
        if cfg.time_budget is not None:
            progress = max(progress, elapsed / cfg.time_budget)
        lr = _lr_at(min(1.0, progress), cfg)
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        texts = []
        for i in idx.tolist():
            variants = data.captions[i]
            if cfg.caption_aug and len(variants) > 1:
                w = weights[: len(variants)]
                texts.append(variants[int(torch.multinomial(w / w.sum(), 1, generator=gen))])
            else:
                texts.append(variants[0])
        text_tokens = tokens(texts)
        ids = positives = None
        if cfg.semantic_targets:
            chosen = idx.tolist()
            positives = semantic_positives(texts, [data.categories[i] for i in chosen], [colours[i] for i in chosen])
        elif cfg.dedup_targets:
            index: dict[str, int] = {}
            ids = torch.tensor([index.setdefault(t, len(index)) for t in texts])
        x = clip_input(data.images[idx], size)
        x = _augment(x, is_crop_all[idx], cfg, gen)

        for group in opt.param_groups:
            group["lr"] = lr
        image_features = F.normalize(model.encode_image(x), dim=-1)
        text_features = F.normalize(encode_text_trimmed(model, text_tokens), dim=-1)
        loss = contrastive_loss(image_features, text_features, model.logit_scale, ids, positives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        losses.append(value)
        window.append(value)
        step += 1
        elapsed = spent + time.perf_counter() - start
        if step % cfg.log_every == 0 or step == total or step == 1:
            point = {"step": step, "loss": round(sum(window) / len(window), 5), "lr": lr,
                     "logit_scale": round(float(model.logit_scale.detach().exp()), 3), "seconds": round(elapsed, 2)}
            curve.append(point)
            window = []
            if log:
                log(f"step {step}/{total} loss {point['loss']:.4f} lr {lr:.2e} "
                    f"scale {point['logit_scale']:.1f} {elapsed:.0f}s")
        if validate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            run_validation()
            if cfg.patience is not None and step - best["step"] >= cfg.patience * cfg.eval_every:
                stopped_by_patience = True
                if log:
                    log(f"validation has not improved for {cfg.patience} evaluations: stopping at step {step}")
                break
        if checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save_checkpoint()
    if window:
        curve.append({"step": step, "loss": round(sum(window) / len(window), 5), "lr": lr,
                      "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
                      "seconds": round(spent + time.perf_counter() - start, 2)})
    if validate is not None and (not validation or validation[-1]["step"] != step):
        run_validation()
    seconds = spent + time.perf_counter() - start
    chosen = step
    if validate is not None and best["state"] is not None:
        model.load_state_dict(best["state"])
        chosen = best["step"]
    model.eval()
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    k = max(1, min(10, len(losses) // 5))
    record = {
        "steps": step,
        "batch_size": batch,
        "items": n,
        "crops": data.n_crops,
        "scenes": data.n_scenes,
        "epochs_seen": round(step * batch / n, 3),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(1, step), 4),
        "stopped_by_time_budget": stopped_by_budget,
        "stopped_by_patience": stopped_by_patience,
        "loss_first": round(sum(losses[:k]) / k, 5),
        "loss_last": round(sum(losses[-k:]) / k, 5),
        "loss_chance": round(math.log(batch), 5),
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "loss_curve": curve,
        "train_config": {**asdict(cfg), "variant_weights": list(cfg.variant_weights)},
    }
    if validate is not None:
        record.update(validation_curve=validation, best_step=chosen,
                      best_score=None if best["score"] is None else round(best["score"], 5))
    return model, spec, record


# --- evaluation ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(model: nn.Module, images: Tensor, size: int, batch: int = 512) -> Tensor:
    """L2-normalised image embeddings of uint8 images (any size; resized as MasQ does)."""
    out = [F.normalize(model.encode_image(clip_input(images[i : i + batch], size)), dim=-1)
           for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], texts: Sequence[str]) -> Tensor:
    """L2-normalised text embeddings."""
    return F.normalize(model.encode_text(tokenizer(list(texts))), dim=-1)


def _accuracy(correct: Tensor, mask: Tensor) -> float | None:
    return round(float(correct[mask].float().mean()), 4) if bool(mask.any()) else None


@torch.no_grad()
def zero_shot_eval(
    model: nn.Module,
    spec: Any,
    data: ShapesData,
    novel: Sequence[str] = DEFAULT_NOVEL,
    templates: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of the crops of ``data`` among all categories, per prompt set.

    Returns ``{prompt set: {"template", "accuracy", "base", "novel", "things", "stuff", "per_category",
    "confusions" (the 8 most common), "confusion_matrix" ({true: {predicted: count}})}, "chance": 1/20, "crops": n,
    "scenes": {...}}``; with scenes in ``data`` also the mean, over
    scenes, of the fraction of the categories its caption names that rank within the top k (k = their count).
    """
    templates = templates or EVAL_TEMPLATES
    tokenizer = get_tokenizer(spec)
    n = data.n_crops
    image_features = encode_images(model, data.images[:n], spec.image_size) if n else None
    truth = torch.tensor([CATEGORY_NAMES.index(c) for c in data.categories[:n]], dtype=torch.long)
    is_novel = torch.tensor([c in set(novel) for c in data.categories[:n]], dtype=torch.bool)
    is_thing = torch.tensor([c not in STUFF_NAMES for c in data.categories[:n]], dtype=torch.bool)
    scene_features = None
    if data.n_scenes:
        scene_features = encode_images(model, data.images[n:], spec.image_size)
    result: dict[str, Any] = {"chance": round(1 / len(CATEGORY_NAMES), 4), "crops": n, "scenes": data.n_scenes}
    for key, template in templates.items():
        text_features = encode_texts(model, tokenizer, [template.format(name) for name in CATEGORY_NAMES])
        entry: dict[str, Any] = {"template": template}
        if n:
            pred = (image_features @ text_features.t()).argmax(dim=1)
            correct = pred == truth
            entry.update(
                accuracy=_accuracy(correct, torch.ones(n, dtype=torch.bool)),
                base=_accuracy(correct, ~is_novel),
                novel=_accuracy(correct, is_novel),
                things=_accuracy(correct, is_thing),
                stuff=_accuracy(correct, ~is_thing),
                per_category={name: _accuracy(correct, truth == i) for i, name in enumerate(CATEGORY_NAMES)
                              if bool((truth == i).any())},
            )
            pairs: dict[str, int] = {}
            for t, p in zip(truth[~correct].tolist(), pred[~correct].tolist()):
                label = f"{CATEGORY_NAMES[t]} -> {CATEGORY_NAMES[p]}"
                pairs[label] = pairs.get(label, 0) + 1
            entry["confusions"] = dict(sorted(pairs.items(), key=lambda kv: -kv[1])[:8])
            matrix = torch.zeros(len(CATEGORY_NAMES), len(CATEGORY_NAMES), dtype=torch.long)
            matrix.index_put_((truth, pred), torch.ones_like(truth), accumulate=True)
            entry["confusion_matrix"] = {CATEGORY_NAMES[t]: {CATEGORY_NAMES[q]: int(c) for q, c in enumerate(row)
                                                            if c} for t, row in enumerate(matrix.tolist())
                                         if sum(row)}
        if scene_features is not None:
            scores = scene_features @ text_features.t()
            recalls = []
            for row, named in zip(scores, data.scene_categories[n:]):
                if not named:
                    continue
                top = set(row.topk(len(named)).indices.tolist())
                recalls.append(sum(CATEGORY_NAMES.index(c) in top for c in named) / len(named))
            entry["scene_recall_at_k"] = round(sum(recalls) / len(recalls), 4) if recalls else None
        result[key] = entry
    return result


# --- files --------------------------------------------------------------------------------------------------------


def sidecar_path(weights: str | Path) -> Path:
    """The config JSON next to a weights file: ``shapes-clip.safetensors`` -> ``shapes-clip.json``."""
    return Path(weights).with_suffix(".json")


def save_clip(model: nn.Module, clip_config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write the CLIP as an open_clip state_dict (``.safetensors``, else ``torch.save``) and its config JSON next to
    it (:func:`sidecar_path`). Returns ``{"weights", "config", "bytes", "digest"}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    cfg_text = json.dumps(clip_config, indent=1, sort_keys=True) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"open_clip_config": json.dumps(clip_config, sort_keys=True),
                                             "format": "open_clip state_dict"})
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(cfg_text, encoding="utf-8")
    side_tmp.replace(side)
    return {"weights": str(path), "config": str(side), "bytes": path.stat().st_size, "digest": tensor_digest(state)}


def load_shapes_clip(path: str | Path) -> tuple[nn.Module, Any]:
    """(model, spec) of a file written by :func:`save_clip`: its config JSON, then ``create_open_clip``."""
    path = Path(path)
    side = sidecar_path(path)
    if side.is_file():
        config = json.loads(side.read_text(encoding="utf-8"))
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "open_clip_config" not in meta:
            raise ValueError(f"{path}: no {side.name} next to it and no config in its metadata")
        config = json.loads(meta["open_clip_config"])
    else:
        raise FileNotFoundError(f"{side}: the config of {path} is missing")
    return create_open_clip(config, path)
