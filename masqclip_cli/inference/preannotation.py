"""Pre-annotation controls: what a labelling team keeps of a result before it reaches a writer (the full result is
kept by the run, so :func:`~masqclip_cli.inference.export.export_run` can apply other controls later).

Every writer sees the result after :meth:`Preannotation.apply`; the controls are part of the run fingerprint only
when one is set, so runs without them keep their fingerprints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from masqclip_cli.structures import Segmentation
from masqclip_cli.vocab import Vocabulary

__all__ = ["Preannotation"]


@dataclass(frozen=True)
class Preannotation:
    """Controls applied to every result before the writers.

    Attributes:
        min_score: drop segments and instances scoring below this (in [0, 1]); a class's own ``min_score`` in a
            JSON vocabulary takes its place for that class.
        min_area: drop those smaller than this many pixels; a value in (0, 1) is a fraction of the image area.
        max_per_image: keep at most this many instances per image (the best-scoring).
        one_label_per_mask: instances sharing one mask (one query under several classes) keep only their best
            class.
    """

    min_score: float | None = None
    min_area: float | None = None
    max_per_image: int | None = None
    one_label_per_mask: bool = False

    def __post_init__(self) -> None:
        if self.min_score is not None and not (math.isfinite(self.min_score) and 0 <= self.min_score <= 1):
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.min_area is not None and not (math.isfinite(self.min_area) and self.min_area >= 0):
            raise ValueError(f"min_area must be >= 0 (pixels, or a fraction of the image below 1), got {self.min_area}")
        if self.max_per_image is not None and int(self.max_per_image) < 0:
            raise ValueError(f"max_per_image must be >= 0, got {self.max_per_image}")

    def active(self, vocab: Vocabulary | None = None) -> bool:
        """Whether anything would be dropped by rule (a vocabulary with per-class floors counts)."""
        per_class = vocab is not None and any(c.min_score is not None for c in vocab)
        return per_class or self != Preannotation()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, seg: Segmentation, vocab: Vocabulary) -> Segmentation:
        """``seg`` with the controls applied (``seg`` itself when none is set)."""
        if not self.active(vocab):
            return seg
        min_score: Any = self.min_score
        if any(c.min_score is not None for c in vocab):
            default = 0.0 if self.min_score is None else self.min_score
            min_score = {i: (c.min_score if c.min_score is not None else default) for i, c in enumerate(vocab)}
        return seg.filter(min_score=min_score, min_area=self.min_area, max_per_image=self.max_per_image,
                          one_label_per_mask=self.one_label_per_mask)
