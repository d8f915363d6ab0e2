"""``masqclip export``: write any format, with any pre-annotation controls, from a finished ``segment`` run, without
a model.

A run keeps, per item, its whole result before the controls (``.masqclip/results/<item id>.json``: the maps as
RLE, the tables as columns, each distinct instance mask once; lossless, see
:func:`~masqclip_cli.structures.segmentation.segmentation_to_record`) next to the record the writers made. Export
reads those back, applies the controls asked for, and runs the writers exactly as the run would have: exporting a
run's own format with its own options reproduces its files byte for byte. The export folder is itself a run folder
(its own fingerprint, records and results), so it can be exported again. Formats that draw on the image
(``overlay``) or copy it decode the source again from the path the run recorded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masqclip_cli.inference.engine import (
    STATE_DIR,
    FingerprintMismatchError,
    RunOptions,
    _check_fingerprint,
    _Decoder,
    _item_info,
    _record_path,
    _StoredRecords,
    read_result,
    result_path,
    writer_view,
)
from masqclip_cli.inference.label_map import LabelMap
from masqclip_cli.inference.preannotation import Preannotation
from masqclip_cli.io.files import atomic_write_text
from masqclip_cli.io.run_lock import RunLock
from masqclip_cli.io.sources import SkipItem, SourceItem
from masqclip_cli.io.writers import make_writers, missing_tasks
from masqclip_cli.io.writers.base import ItemInfo
from masqclip_cli.vocab import Vocabulary

__all__ = ["ExportSummary", "export_run", "read_run"]


@dataclass
class ExportSummary:
    """What an export did."""

    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def read_run(run_dir: Path) -> tuple[dict[str, Any], Vocabulary]:
    """``(fingerprint, vocabulary)`` of a ``segment`` output folder; FingerprintMismatchError when it is none."""
    run_file = Path(run_dir) / STATE_DIR / "run.json"
    try:
        fingerprint = json.loads(run_file.read_text())
        vocab = Vocabulary.from_json(fingerprint["vocabulary"], source=str(run_file))
    except (OSError, KeyError, ValueError) as exc:
        raise FingerprintMismatchError(f"{run_dir}: not a masqclip segment output ({exc})") from None
    return fingerprint, vocab


def export_run(
    run_dir: Path,
    out_dir: Path,
    formats: Sequence[str],
    *,
    writer_options: dict[str, Any] | None = None,
    preannotation: Preannotation = Preannotation(),
    label_map: LabelMap | None = None,
    overwrite: bool = False,
    on_item: Callable[[str, int, int], None] | None = None,
) -> ExportSummary:
    """Write ``formats`` into ``out_dir`` from the results a finished run in ``run_dir`` kept.

    The run's own controls and label map are not inherited: ``preannotation`` and ``label_map`` (if any) apply to
    the whole results the run kept.

    Raises:
        FingerprintMismatchError: ``run_dir`` is no run, ``out_dir`` is ``run_dir``, or ``out_dir`` holds another
            run's outputs (unless ``overwrite``).
        ValueError: a format needs a task the run did not compute; the label map does not fit the run's
            vocabulary (a :class:`~masqclip_cli.inference.label_map.LabelMapError`).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise FingerprintMismatchError(f"{out_dir}: export into a new folder, not into the run itself")
    fingerprint, vocab = read_run(run_dir)
    if fingerprint.get("tracking") is not None:
        raise FingerprintMismatchError(f"{run_dir}: a tracked (video) run cannot be exported yet (the kept results "
                                       "hold no track ids); run segment again with the formats you need")
    tasks = fingerprint.get("postprocess", {}).get("tasks", [])
    for name, absent in missing_tasks(formats, tasks).items():
        raise ValueError(f"format {name} needs task {' or '.join(absent)}, which the run in {run_dir} did not "
                         f"compute (it has {', '.join(tasks) or 'none'})")
    options = dict(writer_options or {})
    writer_vocab = vocab if label_map is None else label_map.mapped_vocabulary(vocab).vocab
    writers = make_writers(formats, out_dir, writer_vocab, **options)
    new_fp = {k: v for k, v in fingerprint.items() if k not in ("preannotation", "label_map")}
    new_fp.update(formats=sorted(w.name for w in writers), writer_options=dict(sorted(options.items())))
    if preannotation != Preannotation():
        new_fp["preannotation"] = preannotation.to_json()
    if label_map is not None:
        new_fp["label_map"] = label_map.to_json()
    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir):
        _check_fingerprint(out_dir, new_fp, overwrite)
        return _export_locked(run_dir, out_dir, vocab, writers, preannotation, label_map, on_item)


def _export_locked(run_dir: Path, out_dir: Path, vocab: Vocabulary, writers: list, preannotation: Preannotation,
                   label_map: LabelMap | None, on_item: Callable[[str, int, int], None] | None) -> ExportSummary:
    """:func:`export_run` under the output folder's lock."""
    summary = ExportSummary()
    record_files = sorted((run_dir / STATE_DIR / "items").rglob("*.json"))
    decoder = _Decoder(RunOptions())
    infos: list[ItemInfo] = []
    for number, record_file in enumerate(record_files, start=1):
        old = json.loads(record_file.read_text())
        item_id = old["id"]
        try:
            seg, source, frame = read_result(run_dir, item_id, vocab)
        except (OSError, ValueError, KeyError) as exc:
            summary.failed.append((item_id, f"{item_id}: the run kept no readable result ({type(exc).__name__}); "
                                            "segment it again to export it"))
            continue
        try:
            kept = writer_view(seg, vocab, preannotation, label_map)
            item = SourceItem(item_id, Path(source), frame)
            needs_source = any(w.needs_source for w in writers)
            info = ItemInfo(id=item_id, file_name=old["file_name"], width=old["width"], height=old["height"],
                            source=source if needs_source else None)
            image = decoder(item) if any(w.needs_image for w in writers) else None
            record: dict[str, Any] = {"id": item_id, "file_name": old["file_name"], "width": old["width"],
                                      "height": old["height"], "writers": {}}
            if needs_source:
                record["source"] = source
            for writer in writers:
                record["writers"][writer.name] = writer.write_item(info, kept, image if writer.needs_image else None)
            target = result_path(out_dir, item_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result_path(run_dir, item_id), target)
            atomic_write_text(_record_path(out_dir, item_id), json.dumps(record, separators=(",", ":")) + "\n")
            infos.append(_item_info(record))
            summary.done += 1
        except SkipItem as exc:
            summary.failed.append((item_id, f"{item_id}: cannot read the source again ({exc})"))
        except Exception as exc:  # noqa: BLE001 - one bad item is reported, never kills the export
            summary.failed.append((item_id, f"{item_id}: {type(exc).__name__}: {exc}".splitlines()[0]))
        if on_item:
            on_item(item_id, number, len(record_files))
    for writer in writers:
        summary.written += writer.finalize(_StoredRecords(out_dir, infos, writer.name))
    return summary
