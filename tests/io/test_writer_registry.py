"""A format is one module: a Writer subclass registers itself, modules of the writers package are found without
being listed anywhere, and the CLI reads the registry (tasks, default format of a task)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from masqclip_cli.io.writers import WRITERS, Writer, check_formats, default_formats, missing_tasks
from masqclip_cli.io.writers.base import REGISTERED_WRITERS

ROOT = Path(__file__).resolve().parents[2]


def test_builtin_formats_and_their_tasks():
    modules = [p.stem for p in (ROOT / "masqclip_cli" / "io" / "writers").glob("*.py")
               if p.stem not in ("__init__", "base")]
    assert len(WRITERS) == len(modules)  # one format per module, every module found
    assert list(WRITERS)[:5] == ["coco", "jsonl", "labels", "overlay", "panoptic"]
    assert default_formats(("panoptic", "semantic", "instance")) == ("panoptic", "labels", "coco")
    assert missing_tasks("coco,labels,jsonl,overlay", ["panoptic"]) == {"coco": ("instance",),
                                                                       "labels": ("semantic",)}
    assert missing_tasks("jsonl", ["semantic"]) == {"jsonl": ("instance", "panoptic")}
    with pytest.raises(ValueError, match="format jsonl needs task instance or panoptic"):
        check_formats(["jsonl"], ["semantic"])
    check_formats(["overlay"], ["semantic"])  # overlay draws any task


def test_subclassing_registers_and_refuses_a_second_name():
    class Geo(Writer):
        name = "test-geo"
        tasks = frozenset({"instance"})

        def write_item(self, item, seg, image=None):
            return None

    try:
        assert REGISTERED_WRITERS["test-geo"] is Geo
        with pytest.raises(ValueError, match="two writers are named 'coco'"):
            type("OtherCoco", (Writer,), {"name": "coco", "write_item": lambda *a: None})
    finally:
        REGISTERED_WRITERS.pop("test-geo", None)


def test_a_new_module_is_a_new_format(tmp_path):
    """Drop one file into (a copy of) the package: --format lists it, with no other file changed."""
    shutil.copytree(ROOT / "masqclip_cli", tmp_path / "masqclip_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    (tmp_path / "masqclip_cli" / "io" / "writers" / "geojson.py").write_text(
        "from masqclip_cli.io.writers.base import Writer\n\n\n"
        "class GeoJsonWriter(Writer):\n"
        "    name = 'geojson'\n"
        "    tasks = frozenset({'instance'})\n\n"
        "    def write_item(self, item, seg, image=None):\n"
        "        return None\n"
    )
    code = ("import masqclip_cli; from masqclip_cli.io.writers import WRITERS, missing_tasks\n"
            "print(masqclip_cli.__file__, sorted(WRITERS), missing_tasks('geojson', []))")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(tmp_path))  # the copy was imported, not the installed package
    assert "'geojson'" in out.stdout and "{'geojson': ('instance',)}" in out.stdout
