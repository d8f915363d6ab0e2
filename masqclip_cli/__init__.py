"""masqclip: open-vocabulary universal image segmentation built on MasQCLIP (ICCV 2023).

The Python API in three names (imported lazily, so that ``masqclip --help`` does not import torch):

- :class:`Predictor` (``masqclip_cli.inference.predictor``): ``Predictor(model, vocab, tasks=...)`` and
  ``predict(image)`` / ``predict_batch(images)``;
- :class:`Segmentation` (``masqclip_cli.structures``): the one result type, with its class names, filters and
  conversions (``to_coco``, ``to_panoptic``, ``to_label_map``, ``to_detections``);
- :func:`load_model` (``masqclip_cli.modeling.factory``): a registered model, one of our model files, or an
  official checkpoint.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "Segmentation", "Segments", "__version__", "load_model"]

_LAZY = {
    "Predictor": "masqclip_cli.inference.predictor",
    "Segmentation": "masqclip_cli.structures",
    "Segments": "masqclip_cli.structures",
    "load_model": "masqclip_cli.modeling.factory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'masqclip_cli' has no attribute '{name}'")
