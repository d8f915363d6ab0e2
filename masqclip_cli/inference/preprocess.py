"""The one test-time preprocessing path: any image input -> ``(H, W, 3)`` uint8 RGB -> the official test resize ->
a ``(3, H', W')`` uint8 tensor, the model's input. Pixel normalisation and padding happen inside the model
(:class:`~masqclip_cli.modeling.masqclip.MasQCLIP`), so a tensor made here is all any caller (``segment``, ``eval``,
proposal recall, label accuracy, :class:`~masqclip_cli.inference.predictor.Predictor`) gives it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from masqclip_cli.io.sources import SkipItem, SourceItem, decode_item, pil_to_rgb

__all__ = ["DEFAULT_TEST_SIZE", "ImageInput", "load_rgb", "prepare_image", "resize_shape", "test_size_of"]

#: The official test resize: short side 640, long side at most 2560.
DEFAULT_TEST_SIZE: dict[str, int] = {"short_side": 640, "max_size": 2560}

#: What :func:`load_rgb` accepts: a path, a PIL image, or an ``(H, W, 3)`` (or ``(H, W)`` grey) uint8 array.
ImageInput = str | os.PathLike | Image.Image | np.ndarray


def resize_shape(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """The official test resize (ResizeShortestEdge): short side to ``short_side``, long side at most ``max_size``;
    ``short_side <= 0`` keeps the size."""
    if short_side <= 0:
        return height, width
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def test_size_of(model: object) -> dict[str, int]:
    """``{"short_side", "max_size"}`` a model was made for (its file's ``test_size``), else the official size."""
    own = getattr(model, "test_size", None) or {}
    return {k: int(own.get(k, v)) for k, v in DEFAULT_TEST_SIZE.items()}


def load_rgb(image: ImageInput) -> np.ndarray:
    """Any accepted image as ``(H, W, 3)`` uint8 RGB (a new, writable array).

    A path is decoded as ``segment`` decodes files (by content, EXIF orientation, any mode to RGB; an unreadable
    file raises :class:`~masqclip_cli.io.sources.SkipItem`, a ValueError); a PIL image is converted the same way;
    an array must be ``(H, W, 3)`` RGB or ``(H, W)`` grey, uint8.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return decode_item(SourceItem(str(path), path)).rgb
    if isinstance(image, Image.Image):
        try:
            return pil_to_rgb(image)
        except ValueError as exc:
            raise SkipItem("<PIL image>", f"unsupported image mode {image.mode!r}: {exc}") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 RGB, got dtype {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"an image array must be (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")
        return np.array(image, dtype=np.uint8, order="C")
    raise TypeError(f"an image must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def prepare_image(rgb: np.ndarray, short_side: int, max_size: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> the model input: the test resize (:func:`resize_shape`, PIL bilinear) as a
    ``(3, H', W')`` uint8 tensor (its own writable memory)."""
    h, w = rgb.shape[:2]
    nh, nw = resize_shape(h, w, short_side, max_size)
    if (nh, nw) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    return torch.from_numpy(np.array(rgb, dtype=np.uint8, order="C")).permute(2, 0, 1)  # a writable copy
