"""``overlay``: the image with translucent masks, outlines and class names, ``out/overlay/<id>.jpg`` (or ``.png``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from masqclip_cli.io.files import atomic_save_png, atomic_write_bytes, output_path
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import segment_stats

from .base import ItemInfo, Writer, check_size

__all__ = ["OverlayWriter", "Region", "render_overlay"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class Region:
    """One thing to draw: a bool mask cropped to its box, the box's top-left corner, an RGB colour, a label."""

    mask: np.ndarray
    x0: int
    y0: int
    color: tuple[int, int, int]
    text: str

    @classmethod
    def from_mask(cls, mask: np.ndarray, color: tuple[int, int, int], text: str) -> Region | None:
        """A region from a full-size mask (None when it is empty)."""
        mask = np.asarray(mask, dtype=bool)
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        return cls(mask[y0:y1, x0:x1], x0, y0, tuple(int(c) for c in color), text)


def _as_rgb(image: np.ndarray, size: tuple[int, int], item_id: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"item {item_id!r}: the overlay image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"item {item_id!r}: the overlay image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.shape[:2] != size:
        raise ValueError(f"item {item_id!r}: image is {image.shape[:2]}, the segmentation {size} (H, W)")
    return image


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = color
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def render_overlay(image: np.ndarray, regions: list[Region], alpha: float = 0.5) -> np.ndarray:
    """Draw ``regions`` on an RGB uint8 image, in order: each mask blended with its colour at ``alpha``, then every
    outline, then every label (at the mask's most interior pixel, on a box of the region's colour). Returns a new RGB
    uint8 array; the drawing is deterministic."""
    h, w = image.shape[:2]
    canvas = image.astype(np.float32)
    for r in regions:
        view = canvas[r.y0 : r.y0 + r.mask.shape[0], r.x0 : r.x0 + r.mask.shape[1]]
        view[r.mask] = view[r.mask] * (1.0 - alpha) + np.asarray(r.color, dtype=np.float32) * alpha
    out = np.ascontiguousarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))

    scale = max(0.35, min(h, w) / 900.0)
    line = max(1, int(round(min(h, w) / 400.0)))
    thickness = max(1, int(round(scale * 1.5)))
    for r in regions:
        contours, _ = cv2.findContours(
            r.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(r.x0, r.y0)
        )
        cv2.drawContours(out, contours, -1, r.color, line, lineType=cv2.LINE_8)
    for r in regions:
        if not r.text:
            continue
        padded = np.pad(r.mask, 1).astype(np.uint8)
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, 3)
        cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
        cx, cy = int(cx) - 1 + r.x0, int(cy) - 1 + r.y0
        (tw, th), base = cv2.getTextSize(r.text, _FONT, scale, thickness)
        x = min(max(cx - tw // 2, 0), max(w - tw - 2, 0))
        y = min(max(cy + th // 2, th + 2), max(h - base - 2, th + 2))
        cv2.rectangle(out, (x - 2, y - th - 2), (x + tw + 2, y + base), r.color, thickness=-1)
        cv2.putText(out, r.text, (x, y), _FONT, scale, _text_color(r.color), thickness, cv2.LINE_AA)
    return out


class OverlayWriter(Writer):
    """Per item ``out/overlay/<item id>.jpg`` (option ``overlay_format="png"`` for ``.png``): the image with every
    segment blended in its class colour (``overlay_alpha``, default 0.5), outlined, and labelled with its class name
    (plus the score for instances and panoptic things). Uses the panoptic result when it has segments, else the
    instances when there are any (drawn lowest score first, so the best is on top), else the semantic map.
    Colours are the vocabulary's (:meth:`Vocabulary.colors`), the same for a class in every image. JPEG quality:
    ``jpeg_quality`` (default 90).
    """

    name = "overlay"
    any_of_tasks = ("panoptic", "instance", "semantic")
    needs_image = True
    option_defaults = {"overlay_format": "jpg", "overlay_alpha": 0.5, "jpeg_quality": 90}
    kind = "overlay"

    def __init__(self, out_dir, vocab, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        fmt = str(self.options["overlay_format"]).lower().lstrip(".")
        fmt = "jpg" if fmt == "jpeg" else fmt
        if fmt not in ("jpg", "png"):
            raise ValueError(f"overlay_format must be 'jpg' or 'png', got {self.options['overlay_format']!r}")
        self.format = fmt
        self.alpha = float(self.options["overlay_alpha"])
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {self.alpha}")
        self.quality = int(self.options["jpeg_quality"])
        if not 1 <= self.quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.quality}")
        self.colors = [tuple(int(c) for c in color) for color in vocab.colors()]

    def _path(self, item: ItemInfo) -> Path:
        assert self.out_dir is not None
        return output_path(self.out_dir, self.kind, item.id, "." + self.format)

    def item_files(self, item: ItemInfo) -> list[Path]:
        return [self._path(item)]

    def regions(self, seg: Segmentation) -> list[Region]:
        """What to draw for a segmentation, in drawing order (empty segments left out)."""
        names, isthing = self.vocab.names, self.vocab.isthing
        size = tuple(int(v) for v in seg.image_size)
        out: list[Region | None] = []

        def sized(array: np.ndarray, what: str) -> np.ndarray:
            array = np.asarray(array)
            if array.shape != size:
                raise ValueError(f"{what} is {array.shape}, the image {size}")
            return array

        # draw the first result that has something to show: panoptic segments, instances, the semantic map
        if seg.panoptic is not None and (seg.segments or (seg.instances is None and seg.semantic is None)):
            pan = sized(seg.panoptic, "panoptic map")
            segments = sorted(seg.segments, key=lambda s: int(s.id))
            indices = [self._category(s.category) for s in segments]
            _, areas, bboxes = segment_stats(pan, [int(s.id) for s in segments])
            # Stuff first, things on top.
            order = sorted(range(len(segments)), key=lambda k: (isthing[indices[k]], int(segments[k].id)))
            for k in order:
                s, index, (x, y, w, h) = segments[k], indices[k], bboxes[k]
                if not areas[k]:
                    continue
                text = f"{names[index]} {float(s.score):.2f}" if isthing[index] else names[index]
                out.append(Region(pan[y : y + h, x : x + w] == int(s.id), x, y, self.colors[index], text))
        elif seg.instances is not None and (seg.instances or seg.semantic is None):
            for inst in sorted(seg.instances, key=lambda s: float(s.score)):
                index = self._category(inst.category)
                if inst.mask is None:
                    raise ValueError(f"instance {inst.id} has no mask")
                text = f"{names[index]} {float(inst.score):.2f}"
                out.append(Region.from_mask(sized(inst.mask, f"instance {inst.id} mask"), self.colors[index], text))
        elif seg.semantic is not None:
            sem = sized(seg.semantic, "semantic map")
            for index in np.unique(sem).tolist():
                if 0 <= index < len(self.vocab):
                    out.append(Region.from_mask(sem == index, self.colors[index], names[index]))
        else:
            raise ValueError("the overlay writer needs panoptic, instance or semantic results")
        return [r for r in out if r is not None]

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> None:
        size = check_size(item, seg)
        if image is None:
            raise ValueError(f"item {item.id!r}: the overlay writer needs the image")
        rgb = _as_rgb(image, size, item.id)
        drawn = render_overlay(rgb, self.regions(seg), self.alpha)
        path = self._path(item)
        if self.format == "png":
            atomic_save_png(path, drawn)
        else:
            ok, buffer = cv2.imencode(
                ".jpg", np.ascontiguousarray(drawn[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, self.quality]
            )
            if not ok:  # pragma: no cover
                raise RuntimeError(f"item {item.id!r}: JPEG encoding failed")
            atomic_write_bytes(path, buffer.tobytes())
        return None
