"""Post-processing of one image's model outputs into a :class:`~masqclip_cli.inference.result.Segmentation`.

The three official MasQCLIP / Mask2Former inference rules (``shared/design/METHOD.md`` §4, golden README §2.3), on
``p_cls`` ``(Q, N)`` = p_obj · p_clip with the background column already dropped and not renormalised, and the
proposal mask logits ``(Q, h, w)`` at stride 4 of the padded network input:

* **semantic** (:func:`semantic_scores`, :func:`semantic_inference`): ``S_c = Σ_q p_cls[q, c]·σ(m_q)``, then the
  per-pixel argmax over classes. Two orders exist in the official code:

  - ``"padded"`` (the official semantic-only test configs, our default): the mask logits are upsampled to the padded
    size, ``S`` is computed there, and the *score map* is cropped to the image and bilinearly resized to the output;
  - ``"resized"`` (the official all-tasks config): ``S`` is computed from the post-processed masks (upsampled to the
    padded size, cropped, resized to the output).

  For the argmax, classes that provably win no pixel are skipped (an exact bound, see ``_semantic_chunks``), so a
  large vocabulary does not cost N full-size score maps.

* **panoptic** (:func:`panoptic_inference`): ``(s_q, c_q) = max_c p_cls[q, c]``; queries with ``s_q > object
  threshold`` are kept; every pixel goes to the kept query with the largest ``s_q·σ(m_q)``; the segment of ``q`` is
  ``(argmax == q) ∧ σ(m_q) ≥ 0.5``; it is dropped when the argmax area, the ``σ ≥ 0.5`` area or their intersection is
  empty, or when ``argmax area / (σ ≥ 0.5 area) < overlap threshold``; queries are visited in index order, a thing
  segment always gets a new id, a stuff segment of an already-seen stuff class reuses that class's id (merge). Ids
  start at 1, 0 = void. The official code gives segments no score: ours is ``s_q`` (for merged stuff, the largest
  ``s_q`` of the merged queries); area and box come from the final map.

* **instance** (:func:`instance_inference`): ``p_cls`` flattened query-major (index = ``q·N + c``), top-``k``
  (``k`` clamped to ``Q·N``), class = index mod N, query = index div N; when the vocabulary has any stuff class
  (and ``keep_stuff`` is off), only thing classes are kept, *after* the top-k (as the official code does with
  panoptic on); mask = logit > 0; score = ``p_cls[q, c] · (Σ σ·mask) / (Σ mask + 1e-6)``.

Masks for panoptic and instance inference are the official ``sem_seg_postprocess`` of the logits
(:func:`~masqclip_cli.modeling.proposals.network.postprocess_masks`: bilinear, ``align_corners=False``, to the padded
size, crop to the image size, bilinear to the output size).

Ties, everywhere, go to the lowest index, as ``torch.argmax``: the lowest class in ``max_c p_cls`` and in the semantic
argmax, the lowest kept query in the panoptic pixel argmax; equal instance scores are ranked by ``(query, class)``
(the top-k itself keeps, among equal scores at the cut, the lowest query-major index). The official ``topk(sorted=
False)`` leaves both unspecified.

The "no object score" ablation is handled upstream: the model then hands ``p_cls = p_clip`` in, and nothing here
changes.

Memory: full-size float masks are only ever made ``chunk`` queries at a time, where ``chunk = min(chunk_size,
max_chunk_bytes // (4·H_out·W_out))`` (at least 1); the panoptic and semantic argmaxes keep a running max/argmax across
chunks, so besides the chunk they hold a few ``(H_out, W_out)`` maps (float32 max, int32 argmax, bool). Semantic scores
are formed ``C`` classes at a time (``C`` as large as ``max_chunk_bytes`` allows), so the ``(N, H_out, W_out)`` volume
is never held when it is larger than that. Discrete results and scores do not depend on ``chunk_size``: every query (and
every class map) is interpolated and passed through σ on its own, since PyTorch's CPU kernels round a 1-plane and a
K-plane call differently (~1e-7); only when ``max_chunk_bytes`` forces the semantic sum itself to be split can its float
rounding move, by ~1e-7. When two tasks read the same upsampled mask planes, :func:`postprocess` keeps them for the
second one if all Q planes of that size fit in ``max_chunk_bytes / 2`` (padded size and output size each): up to
``max_chunk_bytes`` more, never at the sizes where the chunking matters. Instances are returned with their own full-size
bool masks (as the result type requires): ``k·H_out·W_out`` bytes at most. Measured on CPU (Q = 100, N = 150, padded
640x864, defaults): panoptic at 9000x9000 peaks at ~3.2 GB resident (one query per chunk under the 512 MiB cap);
semantic and instance at 4500x4500 at ~2.0 and ~2.8 GB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from masqclip_cli.structures import TASKS, Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox, segment_stats

if TYPE_CHECKING:
    from masqclip_cli.modeling.masqclip import ImageOutput

__all__ = [
    "SEMANTIC_ORDERS",
    "TASKS",
    "PostprocessConfig",
    "instance_inference",
    "panoptic_inference",
    "postprocess",
    "postprocess_output",
    "semantic_inference",
    "semantic_scores",
]

SEMANTIC_ORDERS: tuple[str, ...] = ("padded", "resized")

_DEFAULT_MAX_CHUNK_BYTES = 512 * 2**20

# A mask source: (K,) int64 query indices -> (K, H, W) float32 masks, a fresh tensor the caller may modify in place.
MaskSource = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PostprocessConfig:
    """What to produce and with which thresholds.

    Attributes:
        tasks: a subset of ``("semantic", "panoptic", "instance")``, any order.
        object_mask_threshold: panoptic: keep queries with ``max_c p_cls > this``.
        overlap_threshold: panoptic: drop a segment whose ``argmax area / (σ ≥ 0.5 area)`` is below this.
        detections_per_image: instance: ``k`` of the top-k over the ``Q·N`` scores (clamped to ``Q·N``).
        semantic_order: ``"padded"`` (score map at the padded size, then crop + resize: official semantic configs) or
            ``"resized"`` (from the masks already resized to the output: official all-tasks config).
        instance_keep_stuff: keep stuff classes among the instances; by default, when the vocabulary has any stuff
            class, only thing classes are kept (the official behaviour with panoptic on).
        chunk_size: queries per chunk of full-size upsampled masks (memory; results do not depend on it).
        max_chunk_bytes: further caps a chunk of full-size float32 maps to this many bytes (never below one map).
    """

    tasks: tuple[str, ...] = ("panoptic",)
    object_mask_threshold: float = 0.3
    overlap_threshold: float = 0.3
    detections_per_image: int = 100
    semantic_order: str = "padded"
    instance_keep_stuff: bool = False
    chunk_size: int = 16
    max_chunk_bytes: int = _DEFAULT_MAX_CHUNK_BYTES

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(tasks)))
        if self.semantic_order not in SEMANTIC_ORDERS:
            raise ValueError(f"semantic_order must be one of {list(SEMANTIC_ORDERS)}, got {self.semantic_order!r}")
        if int(self.detections_per_image) < 0:
            raise ValueError(f"detections_per_image must be >= 0, got {self.detections_per_image}")
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if int(self.max_chunk_bytes) < 1:
            raise ValueError(f"max_chunk_bytes must be >= 1, got {self.max_chunk_bytes}")
        for name in ("object_mask_threshold", "overlap_threshold"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------- helpers
def _size2(value: Sequence[int], name: str) -> tuple[int, int]:
    if len(value) != 2:
        raise ValueError(f"{name} must be (H, W), got {value!r}")
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return h, w


def _check_scores(masks: Tensor, p_cls: Tensor, isthing: Sequence[bool] | None) -> tuple[int, int]:
    """Validate ``masks`` (Q, ., .) against ``p_cls`` (Q, N) and ``isthing`` (N,); return (Q, N)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (Q, H, W), got shape {tuple(masks.shape)}")
    if p_cls.ndim != 2:
        raise ValueError(f"p_cls must be (Q, N), got shape {tuple(p_cls.shape)}")
    q, n = p_cls.shape
    if masks.shape[0] != q:
        raise ValueError(f"masks have {masks.shape[0]} queries but p_cls has {q}")
    if n < 1:
        raise ValueError("p_cls has no classes (N = 0)")
    if isthing is not None and len(isthing) != n:
        raise ValueError(f"isthing has {len(isthing)} entries but p_cls has {n} classes")
    return q, n


def _chunk(chunk_size: int | None, pixels: int, max_bytes: int, total: int) -> int:
    """Queries (or classes) per chunk of ``pixels``-sized float32 maps."""
    limit = max(1, int(max_bytes) // (4 * max(1, pixels)))
    step = total if chunk_size is None else int(chunk_size)
    return max(1, min(max(step, 1), limit))


def _tensor_source(masks: Tensor) -> MaskSource:
    """Source over already full-size masks ``(Q, H, W)``."""

    def get(idx: Tensor) -> Tensor:
        return masks.index_select(0, idx.to(masks.device)).to(torch.float32, copy=True)

    return get


class _MaskPlanes:
    """One image's Q mask-logit planes upsampled once and shared by the tasks (semantic, panoptic, instance).

    ``padded(idx)`` = bilinear upsampling of each plane to the padded size; ``output(idx)`` = the official
    ``sem_seg_postprocess`` (:func:`~masqclip_cli.modeling.proposals.network.postprocess_masks`: padded size, crop,
    output size). Both compute every plane exactly as ``postprocess_masks(chunk=1)`` and :func:`_resize_planes` do
    (one plane per interpolation call), so the values are bit-identical to computing them per task; a plane is kept
    after its first use when all Q planes of that size fit in ``max_bytes // 2`` and at least two consumers
    (``padded_consumers`` / ``output_consumers``: the tasks that read that size) will read it; otherwise planes are
    recomputed per call, one chunk at a time. Both return fresh tensors the caller may modify in place.
    """

    def __init__(
        self,
        mask_logits: Tensor,
        padded_size: tuple[int, int],
        image_size: tuple[int, int],
        output_size: tuple[int, int],
        max_bytes: int,
        padded_consumers: int = 2,
        output_consumers: int = 2,
    ) -> None:
        self.logits = mask_logits
        self.padded_size, self.image_size, self.output_size = padded_size, image_size, output_size
        q = int(mask_logits.shape[0])
        dev = mask_logits.device
        hp, wp = padded_size
        ho, wo = output_size
        self._identity = tuple(output_size) == tuple(image_size)  # the last resize is a copy (bit-exact)
        # keep a size only when two consumers read it (else caching costs a copy and saves nothing) and it fits
        padded_users, out_users = int(padded_consumers), int(output_consumers)
        if self._identity:  # output planes are crops of the padded ones
            padded_users, out_users = padded_users + out_users, 0
        keep_padded = padded_users >= 2 and q * hp * wp * 4 <= max_bytes // 2
        keep_out = out_users >= 2 and q * ho * wo * 4 <= max_bytes // 2
        self._padded = torch.empty((q, hp, wp), dtype=torch.float32, device=dev) if keep_padded else None
        self._out = torch.empty((q, ho, wo), dtype=torch.float32, device=dev) if keep_out else None
        self._have_padded = [False] * q
        self._have_out = [False] * q

    def _padded_plane(self, i: int) -> Tensor:
        if self._padded is not None and self._have_padded[i]:
            return self._padded[i]
        plane = self.logits[i][None, None].float()
        plane = F.interpolate(plane, size=self.padded_size, mode="bilinear", align_corners=False)[0, 0]
        if self._padded is not None:
            self._padded[i] = plane
            self._have_padded[i] = True
            return self._padded[i]
        return plane

    def _output_plane(self, i: int) -> Tensor:
        if self._out is not None and self._have_out[i]:
            return self._out[i]
        h, w = self.image_size
        crop = self._padded_plane(i)[:h, :w]
        if self._identity:
            return crop
        plane = F.interpolate(crop[None, None], size=self.output_size, mode="bilinear", align_corners=False)[0, 0]
        if self._out is not None:
            self._out[i] = plane
            self._have_out[i] = True
        return plane

    def padded(self, idx: Tensor) -> Tensor:
        """``(K, Hp, Wp)`` float32 logits of the queries ``idx`` at the padded size (a fresh tensor)."""
        return self._stack([self._padded_plane(i) for i in idx.tolist()], self.padded_size)

    def output(self, idx: Tensor) -> Tensor:
        """``(K, H_out, W_out)`` float32 post-processed logits of the queries ``idx`` (a fresh tensor)."""
        return self._stack([self._output_plane(i) for i in idx.tolist()], self.output_size)

    def _stack(self, planes: list[Tensor], size: tuple[int, int]) -> Tensor:
        if planes:
            return torch.stack(planes)
        return torch.empty((0, *size), dtype=torch.float32, device=self.logits.device)


def _sigmoid_(m: Tensor) -> Tensor:
    """In-place sigmoid of ``(K, H, W)`` masks, one query plane at a time.

    PyTorch's CPU sigmoid computes the vectorised body and the scalar tail of a buffer with different ``exp``
    implementations (1 ulp apart), so a whole-chunk call would make a query's values depend on where it sits in the
    chunk; per plane they depend on the plane alone, and results do not depend on the chunk size.
    """
    for plane in m:
        plane.sigmoid_()
    return m


def _resize_planes(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``(K, h, w)`` to ``(K, *size)``, one plane per call.

    CPU bilinear interpolation of a 1-channel and of a K-channel tensor round differently (~1e-7); one plane per call,
    as ``postprocess_masks(chunk=1)``, makes every plane's values independent of how planes are chunked.
    """
    out = x.new_empty((x.shape[0], *size))
    for i in range(x.shape[0]):
        out[i] = F.interpolate(x[i][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return out


def _running_argmax(
    state: list[Tensor] | None, values: Tensor, offset: int | Tensor, extra: Tensor | None = None
) -> list[Tensor]:
    """Fold one chunk ``values`` (C, H, W) into a running (max (H, W), argmax int32 (H, W)[, extra (H, W)]).

    Within a chunk the first maximum wins (``max(dim=0)``); across chunks an earlier one wins ties (strict ``>``), so
    the result equals the argmax over all chunks at once: lowest index on ties. The chunk's rows are indices
    ``offset + 0..C-1``, or ``offset[0..C-1]`` when ``offset`` is an increasing ``(C,)`` index tensor. ``extra``
    (C, H, W), if given, is gathered at the chunk's argmax and carried along with it.
    """
    cmax, carg = values.max(dim=0)
    cextra = None if extra is None else extra.gather(0, carg.unsqueeze(0)).squeeze(0)
    if isinstance(offset, Tensor):
        carg = offset.to(carg.device)[carg].to(torch.int32)
    else:
        carg = carg.to(torch.int32).add_(offset)
    if state is None:
        return [cmax, carg] if cextra is None else [cmax, carg, cextra]
    upd = cmax > state[0]
    out = [torch.where(upd, cmax, state[0]), torch.where(upd, carg, state[1])]
    if cextra is not None:
        out.append(torch.where(upd, cextra, state[2]))
    return out


# ---------------------------------------------------------------------------------------------------- semantic
def _semantic_chunks(
    mask_logits: Tensor,
    p_cls: Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    order: str,
    chunk_size: int,
    max_bytes: int,
    planes: _MaskPlanes | None = None,
    prune: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(classes, S[classes])``: increasing int64 class indices ``(C,)`` and their semantic scores
    ``(C, H_out, W_out)`` float32, class chunk by class chunk (all N classes, in order, unless ``prune``).

    ``planes``, if given, supplies the upsampled mask logits (shared with the other tasks; same values).

    ``prune`` (for the argmax only): skip classes that provably win no pixel. With ``T(x) = Σ_q σ_q(x)``, ``M(x) =
    max_q σ_q(x)`` and ``W0(x)`` = the best score of the candidate classes (every query's top class), a class ``c``
    scores ``S_c(x) ≤ min(max_q p[q, c]·T(x), Σ_q p[q, c]·M(x))``; when ``max_q p[q, c] < min_x W0/T`` or
    ``Σ_q p[q, c] < min_x W0/M`` (with a 1e-4 relative margin for float rounding) its score is below ``W0(x) ≤
    max_c S_c(x)`` at every pixel, so it can neither win nor tie. Peaky class probabilities over a large vocabulary
    leave a few dozen classes of thousands. Only done when all mask planes fit in ``max_bytes`` and the vocabulary
    is over 4× the candidates."""
    if order not in SEMANTIC_ORDERS:
        raise ValueError(f"order must be one of {list(SEMANTIC_ORDERS)}, got {order!r}")
    q, n = p_cls.shape
    hp, wp = padded_size
    h, w = image_size
    ho, wo = output_size
    if h > hp or w > wp:
        raise ValueError(f"image_size {image_size} exceeds padded_size {padded_size}")
    p = p_cls.detach().to(device=mask_logits.device, dtype=torch.float32)
    logits = mask_logits.detach()
    # Both orders are formed at the output size. For "padded", crop + bilinear resize are linear, so resizing the
    # Q mask planes σ(m_q) (cropped) and then summing Σ_q p[q, c]·R(σ(m_q)) equals resizing the N class score maps
    # R(Σ_q p[q, c]·σ(m_q)) up to float rounding (~1e-7): Q planes are resized instead of N, and the sum runs over
    # the output's pixels instead of the padded input's.
    work = (ho, wo)
    work_px = ho * wo

    if planes is None:  # nothing shared: every plane computed when needed, nothing kept
        planes = _MaskPlanes(logits, padded_size, image_size, output_size, max_bytes, 0, 0)

    def sig(idx: Tensor) -> Tensor:  # (len, ho, wo) sigmoid of the masks at the output size
        if order == "padded":
            m = _sigmoid_(planes.padded(idx))[:, :h, :w]
            return m.contiguous() if (ho, wo) == (h, w) else _resize_planes(m, (ho, wo))
        return _sigmoid_(planes.output(idx))

    qstep = _chunk(chunk_size, work_px, max_bytes, q)
    # chunk bounds stay on the host (indexing with them needs no device sync); the index tensors are host tensors
    # too: the mask planes are looked up per query on the host side, pc rows are gathered on pc's device
    qchunks = [(s, min(s + qstep, q), torch.arange(s, min(s + qstep, q))) for s in range(0, q, qstep)]
    cache: Tensor | None = None
    if q * work_px * 4 <= max_bytes:  # all masks at the working size fit: upsample once, one matmul per class chunk
        cache = torch.empty((q, work_px), dtype=torch.float32, device=logits.device)
        for s0, s1, idx in qchunks:
            cache[s0:s1] = sig(idx).reshape(s1 - s0, work_px)
    classes = torch.arange(n, device=logits.device)
    if prune and cache is not None and q > 0:
        classes = _semantic_candidates(p, cache, classes)
    cstep = _chunk(None, work_px, max_bytes, n)
    for c0 in range(0, int(classes.numel()), cstep):
        cls = classes[c0 : c0 + cstep]
        pc = p.index_select(1, cls)
        if cache is not None:
            scores = torch.mm(pc.T, cache)
        else:
            scores = torch.zeros((len(cls), work_px), dtype=torch.float32, device=logits.device)
            for s0, s1, idx in qchunks:
                scores.addmm_(pc[idx.to(pc.device)].T, sig(idx).reshape(s1 - s0, work_px))
        yield cls, scores.view(len(cls), *work)


def _semantic_candidates(p: Tensor, planes: Tensor, classes: Tensor) -> Tensor:
    """The classes of ``classes`` that may win a pixel of the semantic argmax (see ``_semantic_chunks``' ``prune``).

    Args:
        p: ``(Q, N)`` float32 class probabilities.
        planes: ``(Q, P)`` float32 σ of the masks at the working size, flattened.
        classes: ``(N,)`` int64 ``0..N-1``.

    Returns:
        increasing int64 class indices, a superset of the argmax winners.
    """
    top = torch.unique(p.argmax(dim=1))  # sorted
    if classes.numel() <= 4 * top.numel():
        return classes
    mx = planes.max(dim=0).values  # (P,) M(x)
    if not bool((mx > 0).all()):  # σ underflowed to 0 somewhere: every class ties at 0 there
        return classes
    w0 = torch.mm(p[:, top].T, planes).max(dim=0).values  # (P,) W0(x) <= max_c S_c(x)
    r_sum = float((w0 / planes.sum(dim=0)).min())  # min_x W0 / T
    r_max = float((w0 / mx).min())  # min_x W0 / M
    margin = 1.0 - 1e-4
    p_max, p_sum = p.max(dim=0).values, p.sum(dim=0)
    keep = (p_max >= r_sum * margin) & (p_sum >= r_max * margin)
    keep[top] = True
    return classes[keep]


@torch.no_grad()
def semantic_scores(
    mask_logits: Tensor,
    p_cls: Tensor,
    image_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int] | None = None,
    order: str = "padded",
    chunk_size: int = 16,
    max_chunk_bytes: int = _DEFAULT_MAX_CHUNK_BYTES,
) -> Tensor:
    """Semantic score maps ``S_c = Σ_q p_cls[q, c]·σ(m_q)`` (raw scores, not an argmax).

    Args:
        mask_logits: ``(Q, h, w)`` proposal mask logits at stride 4 of the padded input.
        p_cls: ``(Q, N)`` class probabilities (background already dropped).
        image_size: ``(H, W)`` of the image inside the padded input.
        padded_size: ``(Hp, Wp)`` of the padded network input.
        output_size: ``(H_out, W_out)``; None = ``image_size``.
        order: ``"padded"``: ``S`` at the padded size, then cropped and bilinearly resized; ``"resized"``: ``S`` from
            the masks already post-processed to the output size.
        chunk_size: queries per upsampling chunk (memory only).
        max_chunk_bytes: cap on one chunk of float32 maps (memory only).

    Returns:
        ``(N, H_out, W_out)`` float32 on the device of ``mask_logits``. This materialises all N maps; for the argmax
        alone use :func:`semantic_inference`, which does not.
    """
    _check_scores(mask_logits, p_cls, None)
    image = _size2(image_size, "image_size")
    out_size = image if output_size is None else _size2(output_size, "output_size")
    parts = [
        s
        for _, s in _semantic_chunks(
            mask_logits, p_cls, image, _size2(padded_size, "padded_size"), out_size, order, chunk_size, max_chunk_bytes
        )
    ]
    return torch.cat(parts, dim=0)


@torch.no_grad()
def semantic_inference(
    mask_logits: Tensor,
    p_cls: Tensor,
    image_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int] | None = None,
    order: str = "padded",
    chunk_size: int = 16,
    max_chunk_bytes: int = _DEFAULT_MAX_CHUNK_BYTES,
) -> np.ndarray:
    """Per-pixel argmax over classes of :func:`semantic_scores` (same arguments), lowest class on ties.

    Class chunks are folded into a running max/argmax, so the ``(N, H_out, W_out)`` score volume is never held at once
    when it exceeds ``max_chunk_bytes``.

    Returns:
        ``(H_out, W_out)`` int32 numpy array of class indices ``0..N-1``.
    """
    _check_scores(mask_logits, p_cls, None)
    image = _size2(image_size, "image_size")
    out_size = image if output_size is None else _size2(output_size, "output_size")
    return _semantic_argmax(
        mask_logits, p_cls, image, _size2(padded_size, "padded_size"), out_size, order, chunk_size, max_chunk_bytes
    )


def _semantic_argmax(
    mask_logits: Tensor,
    p_cls: Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    order: str,
    chunk_size: int,
    max_bytes: int,
    planes: _MaskPlanes | None = None,
) -> np.ndarray:
    """The running argmax over the (pruned) class chunks of :func:`_semantic_chunks`: ``(H_out, W_out)`` int32."""
    state: list[Tensor] | None = None
    for cls, s in _semantic_chunks(
        mask_logits, p_cls, image_size, padded_size, output_size, order, chunk_size, max_bytes, planes, prune=True
    ):
        state = _running_argmax(state, s, cls)
    assert state is not None
    return state[1].cpu().numpy().astype(np.int32, copy=False)


# ---------------------------------------------------------------------------------------------------- panoptic
def _panoptic(
    source: MaskSource,
    out_size: tuple[int, int],
    p_cls: Tensor,
    isthing: Sequence[bool],
    object_mask_threshold: float,
    overlap_threshold: float,
    logits: bool,
    chunk: int,
    device: torch.device,
) -> tuple[np.ndarray, list[Segment]]:
    h, w = out_size
    p = p_cls.detach().to(device=device, dtype=torch.float32)
    classes = p.argmax(dim=1)  # lowest class on ties
    scores = p.gather(1, classes[:, None])[:, 0]
    keep = torch.nonzero(scores > float(object_mask_threshold)).flatten()
    k = int(keep.numel())
    if k == 0:
        return np.zeros((h, w), dtype=np.int32), []

    # One pass over the kept queries: running argmax of s_q·σ(m_q), carrying σ(m_winner) ≥ 0.5 along.
    state: list[Tensor] | None = None
    orig_area = torch.zeros(k, dtype=torch.int64, device=device)
    keep_host = keep.cpu()  # (k,) indices: the sources look planes up per query, without a device sync per chunk
    kept_scores = scores[keep]
    for j0 in range(0, k, chunk):
        idx = keep_host[j0 : j0 + chunk]
        m = source(idx)
        if logits:
            m = _sigmoid_(m)
        ge = m >= 0.5
        orig_area[j0 : j0 + len(idx)] = ge.sum(dim=(1, 2))
        prob = m.mul_(kept_scores[j0 : j0 + len(idx)].view(-1, 1, 1))
        state = _running_argmax(state, prob, j0, ge)
        del m, ge, prob
    assert state is not None
    _, arg, win_ge = state
    del state
    mask_area = torch.bincount(arg.flatten(), minlength=k)
    inter_area = torch.bincount(arg[win_ge], minlength=k)

    keep_l = keep_host.tolist()
    cls_l = classes.tolist()
    score_l = scores.tolist()
    ids = [0] * k
    segments: list[Segment] = []
    stuff_ids: dict[int, int] = {}
    for j, (ma, oa, ia) in enumerate(zip(mask_area.tolist(), orig_area.tolist(), inter_area.tolist())):
        if ma == 0 or oa == 0 or ia == 0:
            continue
        if ma / oa < overlap_threshold:
            continue
        q = keep_l[j]
        c = cls_l[q]
        thing = bool(isthing[c])
        if not thing and c in stuff_ids:  # merge into the class's existing stuff segment
            sid = stuff_ids[c]
            ids[j] = sid
            seg = segments[sid - 1]
            seg.score = max(seg.score, score_l[q])
            continue
        sid = len(segments) + 1
        if not thing:
            stuff_ids[c] = sid
        ids[j] = sid
        segments.append(
            Segment(id=sid, category=c, score=score_l[q], isthing=thing, area=0, bbox=(0.0, 0.0, 0.0, 0.0), query=q)
        )

    lut = torch.tensor(ids, dtype=torch.int32, device=device)
    panoptic = torch.where(win_ge, lut[arg], torch.zeros((), dtype=torch.int32, device=device))
    del arg, win_ge
    panoptic_map = panoptic.cpu().numpy().astype(np.int32, copy=False)
    del panoptic
    if segments:
        _, areas, boxes = segment_stats(panoptic_map, [seg.id for seg in segments])
        for seg, area, box in zip(segments, areas, boxes):
            seg.area, seg.bbox = area, tuple(float(v) for v in box)
    return panoptic_map, segments


@torch.no_grad()
def panoptic_inference(
    masks: Tensor,
    p_cls: Tensor,
    isthing: Sequence[bool],
    object_mask_threshold: float = 0.3,
    overlap_threshold: float = 0.3,
    *,
    masks_are_logits: bool = True,
    chunk_size: int = 16,
) -> tuple[np.ndarray, list[Segment]]:
    """Official panoptic inference on full-size masks (see the module docstring for the rule).

    Args:
        masks: ``(Q, H, W)`` mask logits (or sigmoid probabilities with ``masks_are_logits=False``) at output size.
        p_cls: ``(Q, N)`` class probabilities.
        isthing: ``(N,)`` thing (True) / stuff (False) per class.
        object_mask_threshold: keep queries with ``max_c p_cls > this``.
        overlap_threshold: drop a segment with ``argmax area / (σ ≥ 0.5 area) < this``.
        masks_are_logits: whether ``masks`` are logits (σ applied here) or probabilities.
        chunk_size: queries per chunk (memory only).

    Returns:
        ``(panoptic, segments)``: ``(H, W)`` int32 numpy map of segment ids (0 = void) and the segments in id order
        (``mask`` None; ``score`` = ``s_q``, the max over merged stuff queries; ``query`` = the first query).
    """
    _check_scores(masks, p_cls, isthing)
    h, w = int(masks.shape[1]), int(masks.shape[2])
    chunk = max(1, min(int(chunk_size), int(masks.shape[0]) or 1))
    return _panoptic(
        _tensor_source(masks.detach()),
        (h, w),
        p_cls,
        isthing,
        object_mask_threshold,
        overlap_threshold,
        masks_are_logits,
        chunk,
        masks.device,
    )


# ---------------------------------------------------------------------------------------------------- instance
def _instances(
    source: MaskSource,
    p_cls: Tensor,
    isthing: Sequence[bool],
    k: int,
    keep_stuff: bool,
    chunk: int,
    device: torch.device,
) -> list[Segment]:
    q_total, n = p_cls.shape
    k = max(0, min(int(k), q_total * n))
    if k == 0:
        return []
    p = p_cls.detach().to(device=device, dtype=torch.float32)
    flat = p.flatten()  # query-major: index = q·N + c
    top = torch.sort(flat, descending=True, stable=True).indices[:k].tolist()  # ties: lowest index first
    pairs = [(i // n, i % n) for i in top]
    if not keep_stuff and not all(bool(t) for t in isthing):
        pairs = [(q, c) for q, c in pairs if bool(isthing[c])]
    if not pairs:
        return []
    queries = sorted({q for q, _ in pairs})
    per_query: dict[int, tuple[float, int, tuple[float, float, float, float], np.ndarray]] = {}
    qidx = torch.tensor(queries, dtype=torch.int64)  # host indices: the sources look planes up per query
    for s in range(0, len(queries), chunk):
        idx = qidx[s : s + chunk]
        m = source(idx)
        mask = m > 0
        masked_sig = _sigmoid_(m).mul_(mask)
        # One reduction per query (float64), so the result does not depend on how queries are chunked; the sums,
        # the areas and the chunk's final bool masks each come to the host in one transfer (the float planes never).
        num = torch.stack([x.sum(dtype=torch.float64) for x in masked_sig]).tolist()
        areas = mask.sum(dim=(1, 2)).tolist()
        mask_score = [a / (b + 1e-6) for a, b in zip(num, areas)]
        host = mask.cpu().numpy()
        for i, q in enumerate(queries[s : s + chunk]):
            mk = host[i].copy()  # each query its own array, as the result type keeps them
            per_query[q] = (mask_score[i], int(areas[i]), mask_bbox(mk), mk)
        del m, mask, masked_sig, host
    p_cpu = p.cpu()
    found = []
    for q, c in pairs:
        ms, area, box, mk = per_query[q]
        found.append((float(p_cpu[q, c]) * ms, q, c, area, box, mk))
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [
        Segment(id=r + 1, category=c, score=sc, isthing=bool(isthing[c]), area=area, bbox=box, mask=mk, query=q)
        for r, (sc, q, c, area, box, mk) in enumerate(found)
    ]


@torch.no_grad()
def instance_inference(
    mask_logits: Tensor,
    p_cls: Tensor,
    isthing: Sequence[bool],
    k: int = 100,
    keep_stuff: bool = False,
    *,
    chunk_size: int = 16,
) -> list[Segment]:
    """Official instance inference on full-size mask logits (see the module docstring for the rule).

    Args:
        mask_logits: ``(Q, H, W)`` mask logits at output size.
        p_cls: ``(Q, N)`` class probabilities.
        isthing: ``(N,)`` thing / stuff per class.
        k: detections per image, clamped to ``Q·N``.
        keep_stuff: keep stuff classes (by default they are dropped when the vocabulary has any).
        chunk_size: queries per chunk (memory only).

    Returns:
        Instances sorted by descending score (ties by ``(query, class)``), ``id`` = 1-based rank, ``mask`` an
        ``(H, W)`` bool numpy array (instances of the same query share one array), ``area`` its pixel count,
        ``bbox`` its COCO box.
    """
    _check_scores(mask_logits, p_cls, isthing)
    chunk = max(1, int(chunk_size))
    return _instances(_tensor_source(mask_logits.detach()), p_cls, isthing, k, keep_stuff, chunk, mask_logits.device)


# ---------------------------------------------------------------------------------------------------- all tasks
@torch.no_grad()
def postprocess(
    mask_logits: Tensor,
    p_cls: Tensor,
    isthing: Sequence[bool],
    image_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int] | None = None,
    config: PostprocessConfig = PostprocessConfig(),
) -> Segmentation:
    """All requested tasks for one image, at the output size.

    Args:
        mask_logits: ``(Q, Hp/4, Wp/4)`` proposal mask logits at stride 4 of the padded input (``ImageOutput``).
        p_cls: ``(Q, N)`` class probabilities, background dropped (``p_obj·p_clip``, or ``p_clip`` alone when the
            object score is off: that choice is made upstream).
        isthing: ``(N,)`` thing / stuff per class (``Vocabulary.isthing``).
        image_size: ``(H, W)`` of the image inside the padded input.
        padded_size: ``(Hp, Wp)`` of the padded input.
        output_size: ``(H_out, W_out)`` of the result, typically the original image size; None = ``image_size``.
        config: tasks, thresholds, k, semantic order, memory.

    Returns:
        A :class:`Segmentation` with ``image_size = (H_out, W_out)``; ``semantic`` ``(H_out, W_out)`` int32,
        ``panoptic`` ``(H_out, W_out)`` int32 + ``segments``, ``instances`` for the requested tasks (None / empty
        otherwise).
    """
    _check_scores(mask_logits, p_cls, isthing)
    image = _size2(image_size, "image_size")
    padded = _size2(padded_size, "padded_size")
    out_size = image if output_size is None else _size2(output_size, "output_size")
    if image[0] > padded[0] or image[1] > padded[1]:
        raise ValueError(f"image_size {image} exceeds padded_size {padded}")
    device = mask_logits.device
    logits = mask_logits.detach()
    result = Segmentation(image_size=out_size)
    chunk = _chunk(config.chunk_size, out_size[0] * out_size[1], config.max_chunk_bytes, int(logits.shape[0]))

    # The upsampled mask planes are made once for all tasks (kept when they fit in max_chunk_bytes); values equal
    # the per-task computation bit for bit.
    tasks = set(config.tasks)
    semantic_padded = "semantic" in tasks and config.semantic_order == "padded"
    output_users = len(tasks & {"panoptic", "instance"}) + ("semantic" in tasks and not semantic_padded)
    planes = _MaskPlanes(logits, padded, image, out_size, config.max_chunk_bytes, semantic_padded + bool(output_users),
                         output_users)
    if "semantic" in config.tasks:
        result.semantic = _semantic_argmax(
            logits, p_cls, image, padded, out_size, config.semantic_order, config.chunk_size, config.max_chunk_bytes,
            planes,
        )
    if "panoptic" in config.tasks or "instance" in config.tasks:
        source = planes.output
        if "panoptic" in config.tasks:
            result.panoptic, result.segments = _panoptic(
                source,
                out_size,
                p_cls,
                isthing,
                config.object_mask_threshold,
                config.overlap_threshold,
                True,
                chunk,
                device,
            )
        if "instance" in config.tasks:
            result.instances = _instances(
                source, p_cls, isthing, config.detections_per_image, config.instance_keep_stuff, chunk, device
            )
    return result


def postprocess_output(
    output: ImageOutput,
    isthing: Sequence[bool],
    output_size: Sequence[int] | None = None,
    config: PostprocessConfig = PostprocessConfig(),
) -> Segmentation:
    """:func:`postprocess` of one model :class:`~masqclip_cli.modeling.masqclip.ImageOutput` (its ``mask_logits``,
    ``p_cls``, ``image_size`` and ``padded_size``)."""
    return postprocess(
        output.mask_logits, output.p_cls, isthing, output.image_size, output.padded_size, output_size, config
    )
