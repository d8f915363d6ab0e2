"""``coco``: every instance of the run in one COCO instance-segmentation JSON, ``out/instances.json`` (or, with
``coco_layout=cvat``, the folder CVAT's "COCO 1.0" importer and datumaro's ``coco_instances`` read).

The JSON, top-level keys in this order:

* ``info``: ``{"description": "masqclip pre-annotations", "version": <masqclip version>, "contributor":
  "masqclip"}`` -- no date, so that the file stays a pure function of the inputs;
* ``licenses``: ``[]``, or ``[{"id": 1, "name": <coco_license>, "url": ""}]`` when ``coco_license`` is set;
* ``images``: ``id`` (the 1-based rank of the item id, see :func:`~masqclip_cli.io.writers.base.ranked_records`;
  items without a record keep their rank), ``file_name``, ``width``, ``height`` and, with ``coco_license``,
  ``"license": 1``;
* ``annotations``: ``id`` (1, 2, ... over the file), ``image_id``, ``category_id``, ``segmentation`` (see
  ``coco_masks``), ``area`` (the mask's pixel count), ``bbox`` (the mask's integer ``[x, y, w, h]``), ``iscrowd``
  0 and ``score``; instances with an empty mask are left out;
* ``categories``: the vocabulary (``id``, ``name``, ``supercategory``, ``isthing``).

It loads in pycocotools as ground truth (``COCO``) and, with RLE masks, its ``annotations`` as results
(``COCO.loadRes``). Nothing is written per item in the flat layout: an item's record holds its annotations, always
as RLE (whatever ``coco_masks`` is), so ``masqclip export`` can write either encoding from the same run.

Options:

``coco_masks="rle"`` (default): ``segmentation`` is the mask's compressed RLE (``{"size": [H, W], "counts": str}``),
    lossless. ``"polygon"``: a list of polygons ``[[x0, y0, x1, y1, ...], ...]``, computed in ``finalize`` from the
    record's RLE: one polygon per 8-connected part of the mask (parts in raster order of their top-most, left-most
    pixel), each with at least 3 points (6 numbers), coordinates as floats with at most 2 decimals. COCO polygons
    cannot have holes: **holes are filled** (a part lying in another part's hole is then covered twice, which changes
    nothing once rasterised). Each outline runs a quarter pixel inside the part's pixel edges (the
    :func:`~masqclip_cli.io.writers.cvat.cvat_polygons` outline, exteriors only; pixel (c, r) covers
    [c, c+1) x [r, r+1)), so pycocotools (``annToMask``, ``frPyObjects``) rasterises the polygons of an annotation
    back to exactly the mask with its holes filled. ``area`` and ``bbox`` stay those of the mask itself (holes not
    counted), not of the polygons. pycocotools' ``loadRes`` cannot take polygon results (it computes their area as
    RLE): evaluate RLE results against polygon ground truth, or use ``rle``.
``coco_license=""``: a license name; when set, ``licenses`` is ``[{"id": 1, "name": <value>, "url": ""}]`` and
    every image gets ``"license": 1``.
``coco_layout="flat"`` (default): ``out/instances.json``, the ``file_name`` of an image its item's
    ``ItemInfo.file_name`` (the item id). ``"cvat"``: the layout of a CVAT "COCO 1.0" export, which CVAT imports
    and datumaro reads (``datumaro.Dataset.import_from("out/coco-cvat", "coco_instances")``)::

        out/coco-cvat/
            annotations/instances_default.json
            images/default/<file_name>

    ``file_name`` is the image's path under ``images/default/``: the item id (``sub/a.jpg`` ->
    ``images/default/sub/a.jpg``), with ``.png`` appended when the image is written decoded rather than copied -- a
    video frame (``clip.mp4#000005`` -> ``clip.mp4#000005.png``) or an extension outside ``.bmp .jpg .jpeg .png
    .tif .tiff .webp`` (``x.gif`` -> ``x.gif.png``); the rules and the copy code are those of the ``yolo-seg``
    writer. Ids with ``..`` or absolute parts are neutralised as in :func:`~masqclip_cli.io.files.output_path`. Two
    items with the same ``file_name`` (``x.gif`` and ``x.gif.png``) are refused in ``finalize``. datumaro names an
    item after its ``file_name`` without the extension (``sub/a``, ``clip.mp4#000005``), so ``a.jpg`` and ``a.png``
    of one run share the datumaro id ``a``.
``coco_images="copy"`` (only with ``coco_layout=cvat``; validated and ignored with ``flat``): how the images get
    into ``images/default/``: ``"copy"`` the source file byte for byte, ``"symlink"`` an absolute symbolic link to
    it, ``"none"`` no images (only the JSON; put the images under ``images/default/<file_name>`` yourself: datumaro
    needs that folder, CVAT imports the annotations alone into a task that has the images). Frames and images that
    are not copied as they are (see above) are written as PNG of the decoded image in both ``copy`` and
    ``symlink``. With images, the writer declares ``needs_source`` and ``needs_image`` (per instance) and lists the
    image in :meth:`CocoWriter.item_files`, so a resumed run writes a missing image again.

The JSON is streamed from the records (one item's record in memory at a time), byte-deterministic and written
atomically.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli import __version__
from masqclip_cli.io.files import atomic_write_json_stream
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import decode_rle, round_score

from .base import ItemInfo, Writer, check_size, ranked_records

__all__ = ["IMAGE_MODES", "LAYOUTS", "MASK_ENCODINGS", "CocoWriter", "coco_polygons"]

MASK_ENCODINGS = ("rle", "polygon")
LAYOUTS = ("flat", "cvat")
IMAGE_MODES = ("copy", "symlink", "none")

#: The ``info`` object of every file (no date: the output is a pure function of the inputs).
INFO = {"description": "masqclip pre-annotations", "version": __version__, "contributor": "masqclip"}


def coco_polygons(mask: np.ndarray) -> list[list[float]]:
    """The COCO polygon ``segmentation`` of a boolean (H, W) mask: one ``[x0, y0, x1, y1, ...]`` list (at least 6
    floats, 2 decimals at most) per 8-connected part, holes filled, each outline a quarter pixel inside the part's
    pixel edges (see the module docstring); ``[]`` for an empty mask."""
    from .cvat import cvat_polygons  # here, not at the top: importing a format module registers its writer

    return [
        [float(v) for point in points.split(";") for v in point.split(",")]
        for points in cvat_polygons(mask, 0.0, holes=False)
    ]


class CocoWriter(Writer):
    """COCO instance JSON (see the module docstring): ``info``, ``licenses``, ``images`` (id = 1-based rank of the
    item id), ``annotations`` (RLE or polygon segmentation, area, integer bbox, score, iscrowd 0; empty masks are
    left out) and ``categories`` (the vocabulary, with isthing); ``out/instances.json``, or with
    ``coco_layout="cvat"`` ``out/coco-cvat/annotations/instances_default.json`` and the images.

    Options: ``coco_masks`` (``"rle"`` | ``"polygon"``), ``coco_license`` (a name, or ``""``), ``coco_layout``
    (``"flat"`` | ``"cvat"``) and ``coco_images`` (``"copy"`` | ``"symlink"`` | ``"none"``, cvat layout only).
    The record of an item holds its annotations with RLE masks.
    """

    name = "coco"
    tasks = frozenset({"instance"})
    default_for_task = "instance"
    option_defaults = {"coco_masks": "rle", "coco_license": "", "coco_layout": "flat", "coco_images": "copy"}
    file_name = "instances.json"
    #: The cvat layout: ``out/<cvat_dir>/annotations/instances_<subset>.json``, ``out/<cvat_dir>/images/<subset>/``.
    cvat_dir = "coco-cvat"
    cvat_subset = "default"

    def __init__(self, out_dir, vocab, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        for option, choices in (("coco_masks", MASK_ENCODINGS), ("coco_layout", LAYOUTS), ("coco_images", IMAGE_MODES)):
            value = self.options[option]
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
        license_name = self.options["coco_license"]
        if not isinstance(license_name, str):
            raise ValueError(f"coco_license must be a string (a license name, or empty for none), got {license_name!r}")
        self.masks: str = self.options["coco_masks"]
        self.layout: str = self.options["coco_layout"]
        self.license_name: str = license_name
        #: How images get into the cvat layout ("copy", "symlink"), or "none" (also with the flat layout).
        self.mode: str = self.options["coco_images"] if self.layout == "cvat" else "none"
        # Per instance: the engine and export read writer.needs_source / writer.needs_image.
        self.needs_source = self.needs_image = self.mode != "none"

    # --- paths ------------------------------------------------------------------------------------------------------
    def _root(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / self.cvat_dir

    def json_path(self) -> Path:
        """Where :meth:`finalize` writes the JSON."""
        assert self.out_dir is not None
        if self.layout == "cvat":
            return self._root() / "annotations" / f"instances_{self.cvat_subset}.json"
        return self.out_dir / self.file_name

    def _image_path(self, item: ItemInfo) -> tuple[Path, bool]:
        """(``out/coco-cvat/images/default/<id>[.png]``, whether the source is copied as is): the yolo-seg writer's
        rule (``.png`` appended to a video frame and to an extension it does not copy)."""
        from .yolo_seg import image_file_path  # here: importing a format module registers its writer

        return image_file_path(self._root() / "images", self.cvat_subset, item)

    def image_file_name(self, item: ItemInfo) -> str:
        """The ``images[].file_name`` of an item: ``ItemInfo.file_name`` (flat layout), or the image's path relative
        to ``images/default/`` (cvat layout)."""
        if self.layout != "cvat":
            return item.file_name
        path, _ = self._image_path(item)
        return path.relative_to(self._root() / "images" / self.cvat_subset).as_posix()

    def item_files(self, item: ItemInfo) -> list[Path]:
        return [self._image_path(item)[0]] if self.mode != "none" else []

    # --- per item -----------------------------------------------------------------------------------------------------
    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        """The record ``{"annotations": [...]}`` (RLE masks); with the cvat layout and images, the image too.
        ``image``: the decoded (H, W, 3) uint8 RGB image, needed when images are written."""
        size = check_size(item, seg)
        if seg.instances is None:
            raise ValueError(f"item {item.id!r}: the coco writer needs instance results (task 'instance')")
        for inst in seg.instances:
            self._category(inst.category)
        try:
            annotations = seg.to_coco(category_ids=self.category_ids)
        except ValueError as exc:
            raise ValueError(f"item {item.id!r}: {exc}") from None
        if self.mode != "none":
            from .yolo_seg import write_image_file  # here: importing a format module registers its writer

            if image is None:
                raise ValueError(f"item {item.id!r}: coco_images={self.mode} needs the decoded image")
            path, as_is = self._image_path(item)
            write_image_file(item, path, as_is, image, size, self.mode, self.name)
        return {"annotations": annotations}

    # --- run level ------------------------------------------------------------------------------------------------
    def _images(self, records) -> list[dict[str, Any]]:
        """The ``images`` list (one streamed pass); ValueError when two items get the same ``file_name`` in the cvat
        layout (their images would be one file)."""
        images: list[dict[str, Any]] = []
        owners: dict[str, str] = {}
        for image_id, item, record in ranked_records(records):
            if record is None:
                continue
            file_name = self.image_file_name(item)
            if self.layout == "cvat":
                other = owners.setdefault(file_name, item.id)
                if other != item.id:
                    raise ValueError(
                        f"coco: items {other!r} and {item.id!r} both have the image images/{self.cvat_subset}/"
                        f"{file_name} in the cvat layout; rename one of them"
                    )
            entry: dict[str, Any] = {
                "id": image_id,
                "file_name": file_name,
                "width": int(item.width),
                "height": int(item.height),
            }
            if self.license_name:
                entry["license"] = 1
            images.append(entry)
        return images

    def _segmentation(self, rle: dict[str, Any]) -> dict[str, Any] | list[list[float]]:
        if self.masks == "polygon":
            return coco_polygons(decode_rle(rle))
        return {"size": [int(v) for v in rle["size"]], "counts": str(rle["counts"])}

    def finalize(self, records) -> list[Path]:
        """Two streamed passes over ``records`` (images, then annotations): one item's record in memory at a time.
        Polygons (``coco_masks="polygon"``) are computed here from the records' RLE."""
        assert self.out_dir is not None
        images = self._images(records)

        def annotations() -> Iterator[dict[str, Any]]:
            count = 0
            for image_id, _, record in ranked_records(records):
                if record is None:
                    continue
                for ann in record["annotations"]:
                    count += 1
                    yield {
                        "id": count,
                        "image_id": image_id,
                        "category_id": int(ann["category_id"]),
                        "segmentation": self._segmentation(ann["segmentation"]),
                        "area": int(ann["area"]),
                        "bbox": [int(v) for v in ann["bbox"]],
                        "iscrowd": 0,
                        "score": round_score(ann["score"]),
                    }

        licenses = [{"id": 1, "name": self.license_name, "url": ""}] if self.license_name else []
        data = {
            "info": dict(INFO),
            "licenses": licenses,
            "images": images,
            "annotations": annotations(),
            "categories": self._coco_categories(color=False),
        }
        return [atomic_write_json_stream(self.json_path(), data)]
