"""Evaluation: PQ (COCO panoptic API definitions), semantic mIoU (detectron2's), COCO mask AP (pycocotools).

The metric modules are importable without torch; :mod:`.runner` (``masqclip eval``) drives a model or a ``segment``
output folder through them.
"""

from masqclip_cli.evaluation.instance import coco_mask_ap
from masqclip_cli.evaluation.panoptic import PanopticAccumulator, PanopticSegmentInfo, pq_from_counts
from masqclip_cli.evaluation.semantic import SemanticAccumulator

__all__ = ["PanopticAccumulator", "PanopticSegmentInfo", "SemanticAccumulator", "coco_mask_ap", "pq_from_counts"]
