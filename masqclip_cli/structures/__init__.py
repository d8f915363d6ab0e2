"""The bottom layer: the result type (:class:`Segmentation`, :class:`Segments`, :class:`Segment`) and mask
arithmetic (:mod:`masqclip_cli.structures.masks`). Imports nothing else of masqclip."""

from masqclip_cli.structures.segmentation import TASKS, ClassList, Segment, Segmentation, Segments

__all__ = ["TASKS", "ClassList", "Segment", "Segmentation", "Segments"]
