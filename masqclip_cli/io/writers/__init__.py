"""Output writers: what ``masqclip segment --format ...`` writes under ``--out``: ``coco``, ``panoptic``, ``labels``,
``overlay``, ``jsonl`` and the labelling-tool formats ``cvat``, ``label-studio``, ``labelme``, ``yolo-seg``, ``voc``
(docs/formats.md is the table of files, tasks and options; each module's docstring is its full reference).

``<id>`` is the item id with the suffix appended (``a.jpg`` -> ``a.jpg.png``), see :func:`output_path`.

A format is one module in this package: a :class:`Writer` subclass with a ``name`` registers itself (the class
declares the tasks it needs, its options, its default task), and every module here is imported below, so adding a
format touches no other file; the CLI's ``--format`` list and the task checks read :data:`WRITERS`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Iterable, Sequence
from typing import Any

from masqclip_cli.vocab import Vocabulary

from .base import REGISTERED_WRITERS, TASKS, ItemInfo, Writer, needed_tasks
from .coco import CocoWriter
from .jsonl import JsonlWriter
from .labels import LabelsWriter
from .overlay import OverlayWriter
from .panoptic import PanopticWriter

__all__ = [
    "TASKS",
    "WRITERS",
    "CocoWriter",
    "ItemInfo",
    "JsonlWriter",
    "LabelsWriter",
    "OverlayWriter",
    "PanopticWriter",
    "Writer",
    "check_formats",
    "default_formats",
    "make_writers",
    "missing_tasks",
    "needed_tasks",
    "parse_formats",
]


def _import_format_modules() -> None:
    """Import every module of this package (each registers its writers), the built-in ones above first."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_format_modules()

#: Every output format, by ``--format`` name, in registration order (the built-in five first).
WRITERS: dict[str, type[Writer]] = dict(REGISTERED_WRITERS)


def make_writers(
    formats: Sequence[str] | str,
    out_dir: str | os.PathLike[str] | None,
    vocab: Vocabulary,
    **options: Any,
) -> list[Writer]:
    """Writers for ``formats`` (names from :data:`WRITERS`; an entry may hold several separated by commas; case and
    repeats ignored), in the order given.

    Each writer gets only the options it declares (``Writer.option_defaults``), so one options dict can serve every
    format; an option that no known format declares is a ValueError, as is an unknown format.
    """
    names = parse_formats(formats)
    declared = {opt for cls in WRITERS.values() for opt in cls.option_defaults}
    stray = sorted(set(options) - declared)
    if stray:
        raise ValueError(f"unknown writer option(s) {', '.join(stray)}; known options: {', '.join(sorted(declared))}")
    writers = []
    for name in names:
        cls = WRITERS[name]
        own = {k: v for k, v in options.items() if k in cls.option_defaults}
        writers.append(cls(out_dir, vocab, **own))
    return writers


def parse_formats(formats: Sequence[str] | str) -> list[str]:
    """Format names from :data:`WRITERS` (an entry may hold several separated by commas; case and repeats ignored),
    in the order given; an unknown name is a ValueError."""
    if isinstance(formats, str):
        formats = [formats]
    names: list[str] = []
    for entry in formats:
        for name in str(entry).split(","):
            name = name.strip().lower()
            if name and name not in names:
                names.append(name)
    unknown = [n for n in names if n not in WRITERS]
    if unknown:
        raise ValueError(
            f"unknown output format{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}; "
            f"known formats: {', '.join(WRITERS)}"
        )
    return names


def default_formats(tasks: Iterable[str]) -> tuple[str, ...]:
    """The default format of each task, in the tasks' order (the writer whose ``default_for_task`` it is)."""
    by_task = {cls.default_for_task: name for name, cls in WRITERS.items() if cls.default_for_task}
    return tuple(dict.fromkeys(by_task[t] for t in tasks))


def missing_tasks(formats: Sequence[str] | str, tasks: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """For each format that ``tasks`` cannot feed, what is missing: all of its writer's ``tasks`` that are absent,
    or (for an ``any_of_tasks`` writer with none of them) those alternatives, the preferred first."""
    have = set(tasks)
    missing: dict[str, tuple[str, ...]] = {}
    for name in parse_formats(formats):
        cls = WRITERS[name]
        absent = tuple(t for t in sorted(cls.tasks) if t not in have)
        if absent:
            missing[name] = absent
        elif cls.any_of_tasks and not have.intersection(cls.any_of_tasks):
            missing[name] = tuple(cls.any_of_tasks)
    return missing


def check_formats(formats: Sequence[str] | str, tasks: Iterable[str]) -> None:
    """ValueError (naming the format and the task to add) when a format needs a task that ``tasks`` lacks. Call it
    before loading a model, so a run that cannot write what was asked for never starts."""
    for name, absent in missing_tasks(formats, tasks).items():
        joiner = " or " if set(absent) <= set(WRITERS[name].any_of_tasks) else " and "
        raise ValueError(f"format {name} needs task {joiner.join(absent)}")
