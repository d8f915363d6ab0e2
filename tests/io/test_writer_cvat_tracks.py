"""The ``cvat`` writer on tracked sequences: one "CVAT for video 1.1" file per sequence, loaded back with datumaro's
CVAT importer (``Dataset.import_from(folder, "cvat")``): one annotation per track per frame the object is in, with
the track's id and group; masks decode back exactly, polygons rasterise back (pycocotools, as datumaro does) exactly at
tolerance 0 and at IoU >= 0.95 simplified; labels are the decided classes; ``outside`` keyframes close every gap
and the end of each track. datumaro cannot read masks inside tracks (see :func:`import_cvat`)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from masqclip_cli.io.writers import ItemInfo
from masqclip_cli.io.writers import cvat as cvat_module
from masqclip_cli.io.writers.cvat import CvatWriter
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox
from masqclip_cli.vocab import VocabClass, Vocabulary

datumaro = pytest.importorskip("datumaro")
from datumaro.components.annotation import AnnotationType  # noqa: E402
from datumaro.components.errors import DatasetImportError  # noqa: E402
from datumaro.plugins.data_formats.cvat.base import CvatBase  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

CLASSES = [("person", True), ('car & "van"', True), ("road", False)]
VOCAB = Vocabulary([VocabClass(n, isthing=t) for n, t in CLASSES])
NAMES = [n for n, _ in CLASSES]
H, W = 48, 64
SEQ = "clip.mp4"
N_FRAMES = 5


# --- a synthetic sequence -------------------------------------------------------------------------------------------


def ring(top: int, left: int) -> np.ndarray:
    """A 16 x 18 block with a 4 x 4 hole: exact only if holes survive."""
    m = np.zeros((H, W), bool)
    m[top : top + 16, left : left + 18] = True
    m[top + 6 : top + 10, left + 7 : left + 11] = False
    return m


def blob(top: int, left: int, h: int = 10, w: int = 12) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[top : top + h, left : left + w] = True
    return m


def frame_rows(f: int) -> list[tuple[int, int, float, np.ndarray]]:
    """(track id, class index, score, mask) rows of frame ``f`` (one object may have several rows, one per class):

    - track 1: a ring moving right, in every frame; on frame 2 it is a car (0.7) and a person (0.6), one mask;
      decided class person.
    - track 2: a car on frames 0, 1, 3, 4 (gone on 2), of two parts on frame 3; decided class car.
    - track 5: frames 1..3 (then gone), best class car, person, car; not in ``track_classes``: the most common.
    """
    rows = []
    m1 = ring(2, 2 + 3 * f)
    rows += [(1, 1, 0.7, m1), (1, 0, 0.6, m1)] if f == 2 else [(1, 0, 0.9, m1)]
    if f != 2:
        m2 = blob(28, 30 + 2 * f)
        if f == 3:
            m2 = m2 | blob(40, 4, 6, 6)
        rows.append((2, 1, 0.8, m2))
    if 1 <= f <= 3:
        rows.append((5, 0 if f == 2 else 1, 0.55, blob(22, 48, 8, 10)))
    return rows


TRACK_CLASSES = {SEQ: {1: 0, 2: 1}}
DECIDED = {1: 0, 2: 1, 5: 1}
PRESENT = {1: [0, 1, 2, 3, 4], 2: [0, 1, 3, 4], 5: [1, 2, 3]}


def instance_seg(f: int) -> Segmentation:
    rows = [Segment(t, c, s, True, int(m.sum()), mask_bbox(m), mask=m) for t, c, s, m in frame_rows(f)]
    return Segmentation((H, W), instances=rows, vocab=VOCAB)


def expected_mask(track: int, f: int) -> np.ndarray:
    return next(m for t, _, _, m in frame_rows(f) if t == track)


def frame_info(f: int, seq: str = SEQ) -> ItemInfo:
    return ItemInfo(f"{seq}#{f:06d}", seq, W, H, sequence=seq, frame=f)


def rgb_for(f: int) -> np.ndarray:
    return np.random.default_rng(f).integers(0, 255, size=(H, W, 3), dtype=np.uint8)


def run(writer: CvatWriter, frames=range(N_FRAMES), seg=instance_seg, extra=()) -> list[Path]:
    records = list(extra)
    for f in frames:
        info = frame_info(f)
        record = writer.write_item(info, seg(f), rgb_for(f) if writer.needs_image else None)
        records.append((info, json.loads(json.dumps(record))))  # as the engine keeps it
    writer.track_classes = TRACK_CLASSES
    return writer.finalize(sorted(records, key=lambda r: r[0].id))


# --- reading back ---------------------------------------------------------------------------------------------------


def import_cvat(folder: Path):
    """datumaro's items of a CVAT XML folder, by frame number, and whether datumaro needed help with masks.

    datumaro (1.13 and earlier) fails on a ``<mask>`` inside a ``<track>``: ``CvatBase._parse_shape_ann`` reads the
    frame size from the ``<image>`` element, which a video file does not have (``image`` is None). When exactly that
    happens, the file is imported again with the frame size taken from the file's ``<original_size>`` passed in, and
    everything else (parsing, RLE decoding) left to datumaro."""
    try:
        dataset = datumaro.Dataset.import_from(str(folder), "cvat")
        return {item.attributes["frame"]: item for item in dataset}, dataset.categories(), False
    except DatasetImportError as e:
        cause = e.__cause__
        if not (isinstance(cause, AttributeError) and "'NoneType' object has no attribute 'get'" in str(cause)):
            raise
    meta = ET.parse(folder / "annotations.xml").getroot().find("meta/task/original_size")
    size = {"width": meta.find("width").text, "height": meta.find("height").text}
    original = CvatBase._parse_shape_ann.__func__

    def with_frame_size(cls, ann, categories, image):  # noqa: ANN001
        return original(cls, ann, categories, size if image is None else image)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CvatBase, "_parse_shape_ann", classmethod(with_frame_size))
        dataset = datumaro.Dataset.import_from(str(folder), "cvat")
        items = {item.attributes["frame"]: item for item in dataset}
        return items, dataset.categories(), True


def present_annotations(item) -> list:
    return [a for a in item.annotations if not a.attributes.get("outside")]


def polygon_mask(polygon) -> np.ndarray:
    """A datumaro polygon rasterised as datumaro does it (pycocotools)."""
    rle = mask_util.frPyObjects([list(polygon.points)], H, W)
    return mask_util.decode(mask_util.merge(rle)).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def xml_tracks(path: Path) -> list[ET.Element]:
    return ET.parse(path).getroot().findall("track")


# --- tests ----------------------------------------------------------------------------------------------------------


def test_video_file_layout_and_meta(tmp_path):
    written = run(CvatWriter(tmp_path, VOCAB))
    path = tmp_path / "cvat" / SEQ / "annotations.xml"
    assert written == [path]
    assert not (tmp_path / "cvat" / "annotations.xml").exists()  # nothing outside a sequence
    assert not (tmp_path / ".masqclip" / "cvat-tracks").exists()  # the scratch files are gone
    root = ET.parse(path).getroot()
    task = root.find("meta/task")
    assert task.findtext("name") == SEQ and task.findtext("mode") == "interpolation"
    assert (task.findtext("size"), task.findtext("start_frame"), task.findtext("stop_frame")) == ("5", "0", "4")
    assert (task.findtext("original_size/width"), task.findtext("original_size/height")) == (str(W), str(H))
    assert [label.findtext("name") for label in task.findall("labels/label")] == NAMES
    assert {a.findtext("mutable") for a in task.iter("attribute")} == {"True"}  # score varies per frame
    assert root.findall("image") == []
    tracks = xml_tracks(path)
    assert [t.get("id") for t in tracks] == ["0", "1", "2"]
    assert [int(t.get("group_id")) for t in tracks] == [1, 2, 5]
    assert [t.get("label") for t in tracks] == [NAMES[DECIDED[k]] for k in (1, 2, 5)]
    for track, element in zip((1, 2, 5), tracks):
        shapes = list(element)
        assert all(s.tag == "mask" and s.get("keyframe") == "1" for s in shapes)
        frames = [(int(s.get("frame")), s.get("outside")) for s in shapes]
        inside = [f for f, o in frames if o == "0"]
        assert inside == PRESENT[track]
        # an outside keyframe right after each run of frames, unless that is past the last frame
        runs_end = [f + 1 for f in inside if f + 1 not in inside and f + 1 < N_FRAMES]
        assert [f for f, o in frames if o == "1"] == runs_end
        assert [f for f, _ in frames] == sorted(f for f, _ in frames)


def test_masks_load_back_exactly_through_datumaro(tmp_path):
    run(CvatWriter(tmp_path, VOCAB))
    items, categories, _ = import_cvat(tmp_path / "cvat" / SEQ)
    labels = categories[AnnotationType.label]
    assert [label.name for label in labels.items] == NAMES
    assert sorted(items) == list(range(N_FRAMES))
    track_ids: dict[int, set[int]] = {}
    for f in range(N_FRAMES):
        anns = present_annotations(items[f])
        assert sorted(a.group for a in anns) == sorted(t for t, frames in PRESENT.items() if f in frames)
        for ann in anns:
            assert ann.type == AnnotationType.mask
            assert labels.items[ann.label].name == NAMES[DECIDED[ann.group]]
            assert ann.attributes["keyframe"] is True
            track_ids.setdefault(ann.group, set()).add(ann.attributes["track_id"])
            assert np.array_equal(ann.image.astype(bool), expected_mask(ann.group, f)), (f, ann.group)
    assert track_ids == {1: {0}, 2: {1}, 5: {2}}  # one CVAT track per object, the same in every frame
    # the outside keyframes come back as such, on the frame after each track's last run
    outside = sorted((f, a.group) for f, item in items.items() for a in item.annotations if a.attributes["outside"])
    assert outside == [(2, 2), (4, 5)]


def test_score_is_the_frames_score_of_the_decided_class(tmp_path):
    run(CvatWriter(tmp_path, VOCAB))
    items, _, _ = import_cvat(tmp_path / "cvat" / SEQ)
    scores = {(f, a.group): a.attributes["score"] for f, item in items.items() for a in present_annotations(item)}
    assert scores[(2, 1)] == "0.6"  # frame 2 has track 1 as a car (0.7) and a person (0.6): person is decided
    assert scores[(1, 1)] == "0.9" and scores[(2, 5)] == "0.55"
    # without scores: no attribute
    (path,) = run(CvatWriter(tmp_path / "no-scores", VOCAB, cvat_scores=False))
    items, _, _ = import_cvat(path.parent)
    assert not any("score" in a.attributes for item in items.values() for a in item.annotations)


def test_polygons_load_back_through_datumaro_with_parts_grouped(tmp_path):
    run(CvatWriter(tmp_path, VOCAB, cvat_shapes="polygon"))
    items, categories, patched = import_cvat(tmp_path / "cvat" / SEQ)
    assert not patched  # polygons in tracks need no help
    labels = categories[AnnotationType.label]
    for f in range(N_FRAMES):
        anns = present_annotations(items[f])
        assert all(a.type == AnnotationType.polygon for a in anns)
        groups: dict[int, list] = {}
        for a in anns:
            groups.setdefault(a.group, []).append(a)
            assert labels.items[a.label].name == NAMES[DECIDED[a.group]]
        assert sorted(groups) == sorted(t for t, frames in PRESENT.items() if f in frames)
        for track, polygons in groups.items():
            union = np.zeros((H, W), bool)
            for polygon in polygons:
                union |= polygon_mask(polygon)
            assert np.array_equal(union, expected_mask(track, f)), (f, track)  # exact at tolerance 0
        assert len(groups.get(2, [])) == (2 if f == 3 else int(f != 2))  # two parts on frame 3
    # track 2's second part is a CVAT track of its own, in the same group, on frame 3 only (then outside)
    tracks = xml_tracks(tmp_path / "cvat" / SEQ / "annotations.xml")
    assert [int(t.get("group_id")) for t in tracks] == [1, 2, 2, 5]
    second = [(s.get("frame"), s.get("outside")) for s in tracks[2]]
    assert second == [("3", "0"), ("4", "1")]


def test_simplified_polygons_keep_iou(tmp_path):
    run(CvatWriter(tmp_path, VOCAB, cvat_shapes="polygon", cvat_polygon_tolerance=1.0))
    items, _, _ = import_cvat(tmp_path / "cvat" / SEQ)
    for f in range(N_FRAMES):
        groups: dict[int, np.ndarray] = {}
        for a in present_annotations(items[f]):
            groups[a.group] = groups.get(a.group, np.zeros((H, W), bool)) | polygon_mask(a)
        for track, union in groups.items():
            assert iou(union, expected_mask(track, f)) >= 0.95, (f, track)


def test_panoptic_stuff_is_a_track_per_class(tmp_path):
    def panoptic_seg(f: int) -> Segmentation:
        pan = np.full((H, W), 9, np.int32)  # road: stuff id 9 for the whole sequence
        pan[:, :4] = 0  # unlabelled
        pan[ring(2, 2 + 3 * f)] = 1
        segments = [Segment(1, 0, 0.9, True, 0, (0, 0, 0, 0)), Segment(9, 2, 1.0, False, 0, (0, 0, 0, 0))]
        return Segmentation((H, W), panoptic=pan, segments=segments, vocab=VOCAB)

    run(CvatWriter(tmp_path, VOCAB), seg=panoptic_seg)
    items, categories, _ = import_cvat(tmp_path / "cvat" / SEQ)
    labels = categories[AnnotationType.label]
    for f in range(N_FRAMES):
        anns = {a.group: a for a in present_annotations(items[f])}
        assert sorted(anns) == [1, 9]
        assert labels.items[anns[9].label].name == "road"  # not in track_classes: its (only) class
        road = np.ones((H, W), bool)
        road[:, :4] = False
        road &= ~ring(2, 2 + 3 * f)
        assert np.array_equal(anns[9].image.astype(bool), road)
        assert np.array_equal(anns[1].image.astype(bool), ring(2, 2 + 3 * f))


def test_images_outside_sequences_stay_in_the_image_file(tmp_path):
    image = ItemInfo("a.jpg", "a.jpg", W, H)
    writer = CvatWriter(tmp_path, VOCAB)
    record = writer.write_item(image, instance_seg(0))
    written = run(writer, extra=[(image, record)])
    assert written == [tmp_path / "cvat" / "annotations.xml", tmp_path / "cvat" / SEQ / "annotations.xml"]
    root = ET.parse(written[0]).getroot()
    assert [i.get("name") for i in root.findall("image")] == ["a.jpg"]  # the frames are not images of it
    assert root.findtext("meta/task/size") == "1" and root.findtext("meta/task/mode") == "annotation"
    assert root.findall("track") == []
    assert len(xml_tracks(written[1])) == 3


def test_two_sequences_and_frame_images(tmp_path):
    writer = CvatWriter(tmp_path, VOCAB, cvat_shapes="polygon", cvat_images="copy")
    assert writer.needs_image
    records = []
    for seq, frames in (("sub/b.mp4", range(2)), (SEQ, range(N_FRAMES))):
        for f in frames:
            info = frame_info(f, seq)
            records.append((info, writer.write_item(info, instance_seg(f), rgb_for(f))))
            png = tmp_path / "cvat" / Path(seq) / "images" / f"frame_{f:06d}.png"
            assert writer.item_files(info) == [png]
            assert np.array_equal(np.asarray(Image.open(png)), rgb_for(f))
    writer.track_classes = TRACK_CLASSES
    written = writer.finalize(sorted(records, key=lambda r: r[0].id))
    assert written == [tmp_path / "cvat" / SEQ / "annotations.xml", tmp_path / "cvat" / "sub" / "b.mp4" /
                       "annotations.xml"]
    items, _, _ = import_cvat(tmp_path / "cvat" / "sub" / "b.mp4")
    assert sorted(items) == [0, 1]  # its last frame is 1: no outside keyframe after it
    assert all(Path(item.media.path).is_file() for item in items.values())  # datumaro finds the frames
    assert ET.parse(written[1]).getroot().findtext("meta/task/stop_frame") == "1"


def test_a_restarted_run_gives_the_same_bytes(tmp_path):
    (single,) = run(CvatWriter(tmp_path / "one", VOCAB, cvat_shapes="polygon"))
    first = CvatWriter(tmp_path / "two", VOCAB, cvat_shapes="polygon")
    records = [(frame_info(f), json.loads(json.dumps(first.write_item(frame_info(f), instance_seg(f)))))
               for f in range(2)]
    (again,) = run(CvatWriter(tmp_path / "two", VOCAB, cvat_shapes="polygon"), frames=range(2, N_FRAMES),
                   extra=records)
    assert single.read_bytes() == again.read_bytes()


def test_small_scratch_buffer_gives_the_same_bytes(tmp_path, monkeypatch):
    (default,) = run(CvatWriter(tmp_path / "a", VOCAB))
    monkeypatch.setattr(cvat_module, "_SCRATCH_FLUSH", 1)  # write every shape to the scratch file at once
    (small,) = run(CvatWriter(tmp_path / "b", VOCAB))
    assert default.read_bytes() == small.read_bytes()


def test_frames_out_of_order_or_twice_are_refused(tmp_path):
    writer = CvatWriter(tmp_path, VOCAB)
    info = frame_info(1)
    record = writer.write_item(info, instance_seg(1))
    twice = ItemInfo("clip.mp4#000001b", SEQ, W, H, sequence=SEQ, frame=1)
    with pytest.raises(ValueError, match="track 1 of sequence 'clip.mp4' has frame 1 after frame 1"):
        writer.finalize([(info, record), (twice, record)])
    with pytest.raises(ValueError, match="frame number"):
        writer.write_item(ItemInfo("x.mp4#000001", "x.mp4", W, H, sequence="x.mp4"), instance_seg(0))
    bad = Segmentation((H, W), instances=[Segment(0, 0, 0.9, True, 4, (0, 0, 2, 2), mask=blob(0, 0, 2, 2))])
    with pytest.raises(ValueError, match="track ids are >= 1"):
        writer.write_item(info, bad)
