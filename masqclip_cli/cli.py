"""The ``masqclip`` command line: a thin shell over the library (parse, call, report).

Errors in the input are one line on stderr (``error: <file>:<line>: <problem>``) and exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from masqclip_cli import __version__
from masqclip_cli.structures import TASKS

app = typer.Typer(
    name="masqclip",
    help=(
        "Open-vocabulary universal image segmentation (semantic, instance, panoptic) for any list of class names, "
        "built on MasQCLIP (ICCV 2023).\n\n"
        "Start with the vocabulary: `masqclip vocab show \"person; car, automobile; road \\[stuff]\"` shows how a "
        "class list is read; `masqclip vocab presets` lists the standard benchmark vocabularies."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
vocab_app = typer.Typer(
    help=(
        "Inspect vocabularies. A VOCAB is, in this order of precedence: a file (text: one class per line, "
        "`name, synonym, ... \\[thing|stuff]`, `label: name, name` encodes only the names after the colon, `#` "
        "comments; or JSON: a list of {name, synonyms, isthing, id, color}); a preset name (`coco-panoptic`, "
        "`ade20k-150`, ... or `preset:NAME`); or an inline list separated by `;` "
        "(`\"person; car, automobile; road \\[stuff]\"`, a trailing `;` forces inline)."
    ),
    no_args_is_help=True,
)
model_app = typer.Typer(help="Inspect model files (our safetensors format).", no_args_is_help=True)
app.add_typer(vocab_app, name="vocab")
app.add_typer(model_app, name="model")

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error on stderr and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"masqclip {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """masqclip: segment images with any vocabulary."""


@vocab_app.command("show")
def vocab_show(
    vocab: str = typer.Argument(..., help="A vocabulary file, a preset name or an inline `a; b; c \\[stuff]` list."),
    as_json: bool = typer.Option(False, "--json", help="Print the parsed vocabulary as JSON (the JSON file format)."),
) -> None:
    """Print how a vocabulary is parsed: index, id, display name, the names that are encoded, thing/stuff."""
    from masqclip_cli.vocab import VocabularyError, load_vocabulary

    try:
        vocabulary = load_vocabulary(vocab)
    except VocabularyError as exc:
        raise fail(str(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps(vocabulary.to_json(), indent=1) + "\n")
        return
    table = Table(title=f"{vocabulary.source}: {len(vocabulary)} classes "
                  f"({len(vocabulary.thing_indices)} thing, {len(vocabulary.stuff_indices)} stuff)")
    table.add_column("#", justify="right")
    table.add_column("id", justify="right")
    table.add_column("name")
    table.add_column("encoded names")
    table.add_column("type")
    table.add_column("colour")
    for index, (cls, class_id, colour) in enumerate(zip(vocabulary, vocabulary.ids, vocabulary.colors())):
        hex_colour = "#{:02x}{:02x}{:02x}".format(*colour)
        table.add_row(
            str(index),
            str(class_id),
            cls.name,
            " | ".join(cls.prompts),
            "thing" if cls.isthing else "stuff",
            f"[{hex_colour}]■[/] {hex_colour}",
        )
    out.print(table)


@vocab_app.command("presets")
def vocab_presets() -> None:
    """List the shipped benchmark vocabularies with their class counts."""
    from masqclip_cli.vocab import VocabularyError, list_presets

    try:
        presets = list_presets()
    except VocabularyError as exc:
        raise fail(str(exc)) from None
    table = Table(title="vocabulary presets (use with --vocab NAME)")
    for column in ("name", "classes", "thing", "stuff", "COCO ids"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for p in presets:
        table.add_row(p.name, str(p.num_classes), str(p.num_things), str(p.num_stuff), "yes" if p.has_ids else "")
    out.print(table)


@model_app.command("info")
def model_info(path: Path = typer.Argument(..., help="A masqclip model file (.safetensors).")) -> None:
    """Print a model file's header: CLIP model, input size, proposal network, thresholds, stored vocabulary."""
    from masqclip_cli.modeling.checkpoint import ModelFileError, read_header

    try:
        config = read_header(path)
    except ModelFileError as exc:
        raise fail(str(exc)) from None
    clip = config["clip"]
    vocab = config.get("vocabulary")
    table = Table(title=f"{path}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("format version", str(config.get("format_version")))
    table.add_row("CLIP model", str(clip.get("model_name") or "custom config"))
    table.add_row("CLIP weights", str(clip.get("pretrained")))
    table.add_row("CLIP input", f"{clip.get('image_size')} px")
    table.add_row("quick_gelu", str(clip["model_cfg"].get("quick_gelu", False)))
    table.add_row("text tower", "yes" if clip.get("has_text_tower", True) else "no (fixed vocabulary)")
    table.add_row("f_Q′ init", str(config["masq"].get("fq_init")))
    table.add_row("proposal network", json.dumps(config.get("proposals")) if config.get("proposals") else "none")
    table.add_row("thresholds", json.dumps(config.get("thresholds")))
    table.add_row("vocabulary", f"{len(vocab)} classes" if vocab else "none")
    out.print(table)


@app.command("models")
def models_list() -> None:
    """List the registered models, whether their weights are on this machine, and where to put missing ones."""
    from masqclip_cli.modeling.factory import MODEL_REGISTRY, model_status, models_dir

    table = Table(title=f"registered models (weights folder: {models_dir()}, set MASQCLIP_MODELS_DIR to change)")
    for column in ("name", "available", "weights", "description"):
        table.add_column(column)
    missing = []
    for entry in MODEL_REGISTRY.values():
        available, path = model_status(entry)
        weights = "random (built in)" if path is None else str(path)
        table.add_row(entry.name, "[green]yes[/]" if available else "[red]no[/]", weights, entry.description)
        if not available:
            missing.append(entry)
    out.print(table)
    for entry in missing:
        out.print(f"[bold]{entry.name}[/]: " + entry.source.replace("{path}", str(model_status(entry)[1])),
                  highlight=False)


def _json_or_name(value: str) -> str | dict:
    """A JSON config file's content, or the value itself (a registered name)."""
    path = Path(value)
    if path.suffix == ".json" and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise fail(f"{path}: cannot read JSON config ({exc})") from None
    return value


@app.command("convert")
def convert(
    source: Path = typer.Argument(..., help="Official MasQCLIP checkpoint (.pth: teacher, student or MasQ-tuning)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Our model file to write (.safetensors)."),
    proposals: str = typer.Option(
        "m2f-r50", help="Proposal-network geometry of the checkpoint: a config name or a JSON config file."
    ),
    clip_model: str = typer.Option(
        "ViT-L-14-336-quickgelu", help="open_clip model of the CLIP branch: a model name or a JSON config file."
    ),
    clip_weights: str = typer.Option(
        "openai", help="open_clip pretrained tag or local weights file for the text tower; 'none' for random."
    ),
    allow_partial: bool = typer.Option(
        False, help="Convert despite unknown, missing or mis-shaped keys; the report lists what was left at init."
    ),
    tie_mask_embeddings: bool = typer.Option(
        False, help="Overwrite mask_embeddings with the CLS position embedding, as the official loader does."
    ),
) -> None:
    """Convert an official detectron2-format checkpoint into our model file."""
    from masqclip_cli.modeling.clip_loader import WeightsNotFoundError
    from masqclip_cli.modeling.convert import ConversionError, convert_checkpoint_file

    try:
        report = convert_checkpoint_file(
            source,
            out_path,
            proposals=_json_or_name(proposals),
            clip_model=_json_or_name(clip_model),
            clip_pretrained=None if clip_weights.lower() == "none" else clip_weights,
            allow_partial=allow_partial,
            tie_mask_embeddings=tie_mask_embeddings,
        )
    except (ConversionError, WeightsNotFoundError, ValueError) as exc:
        raise fail(f"{source}: {exc}" if str(source) not in str(exc) else str(exc)) from None
    for line in report.lines():
        err.print(line, highlight=False)
    out.print(f"wrote {out_path}")




def _split_list(value: str, what: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    if not items:
        raise fail(f"--{what}: empty list")
    if allowed is not None:
        unknown = [v for v in items if v not in allowed]
        if unknown:
            raise fail(f"--{what}: unknown {', '.join(unknown)} (use {', '.join(allowed)})")
    return items


def _writer_options(pairs: list[str], **named: Any) -> dict[str, Any]:
    """Writer options from ``--option key=value`` pairs (typed by the option's default) and the named flags."""
    from masqclip_cli.io.writers import WRITERS

    defaults = {k: v for cls in WRITERS.values() for k, v in cls.option_defaults.items()}
    options = {k: v for k, v in named.items() if v is not None}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            known = ", ".join(sorted(k for k in defaults if k != "stream"))
            raise fail(f"--option {pair!r}: expected key=value with key one of {known}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1", "yes")
            elif isinstance(default, (int, float)):
                value = type(default)(raw)
            else:
                value = raw
        except ValueError:
            raise fail(f"--option {pair!r}: {key} takes a {type(default).__name__}") from None
        options[key] = value
    return options


def _preannotation(min_score: float | None, min_area: float | None, max_per_image: int | None,
                   one_label_per_mask: bool) -> Any:
    from masqclip_cli.inference.preannotation import Preannotation

    try:
        return Preannotation(min_score=min_score, min_area=min_area, max_per_image=max_per_image,
                             one_label_per_mask=one_label_per_mask)
    except ValueError as exc:
        message = str(exc)
        for name in ("min_score", "min_area", "max_per_image"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise fail(message) from None


def _check_device(device: str) -> str:
    """``device`` resolved (``auto`` → the best available) and checked to exist here: exit 2 with one line naming what
    is available otherwise."""
    import torch

    from masqclip_cli.modeling.factory import resolve_device

    name = device.strip().lower()
    kind, _, index = name.partition(":")
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    if name == "auto":
        return resolve_device("auto")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise fail(f"--device: unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    if name not in available:
        raise fail(f"--device {device}: not available on this machine (available: {', '.join(available)})")
    return name


def _check_numbers(**values: Any) -> None:
    """Exit 2 with one line for an option out of its range: thresholds in [0, 1], ``topk`` >= 1, sizes >= 1 (short
    side: >= 0, where 0 keeps the size)."""
    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name.endswith("threshold"):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
                raise fail(f"{flag} must be a number in [0, 1], got {value}")
        elif name == "short_side" and value < 0:
            raise fail(f"{flag} must be >= 0 (0 keeps the image size), got {value}")
        elif name != "short_side" and value < 1:
            raise fail(f"{flag} must be >= 1, got {value}")


def _parse_shard(value: str | None) -> tuple[int, int]:
    from masqclip_cli.inference.engine import resolve_shard

    try:
        return resolve_shard(value)
    except ValueError as exc:
        raise fail(f"--shard: {exc}") from None


# The pre-annotation controls, shared by segment and export.
_MIN_SCORE = typer.Option(None, help="Pre-annotation: drop segments and instances scoring below this (a class's "
                          "own min_score in a JSON vocabulary wins).")
_MIN_AREA = typer.Option(None, help="Pre-annotation: drop those smaller than this many pixels (a value below 1: a "
                         "fraction of the image).")
_MAX_PER_IMAGE = typer.Option(None, help="Pre-annotation: keep the best N instances per image.")
_ONE_LABEL_PER_MASK = typer.Option(False, help="Pre-annotation: a mask found under several classes keeps only its "
                                   "best class.")
_LABEL_MAP = typer.Option(None, "--label-map", help="Project labels: a JSON, CSV or TSV file mapping vocabulary "
                          "classes to the annotation project's label names and ids (rename, merge, drop; "
                          "docs/formats.md).")


def _label_map(path: Path | None) -> Any:
    from masqclip_cli.inference.label_map import LabelMap

    if path is None:
        return None
    try:
        return LabelMap.load(path)
    except ValueError as exc:
        raise fail(str(exc)) from None


def _check_labels_ids(formats: tuple[str, ...], label_map: Any, vocabulary: Any) -> None:
    """Exit 2 before the model runs when the labels format cannot hold the (mapped) vocabulary's ids."""
    from masqclip_cli.io.writers.labels import check_labels_vocabulary

    if "labels" in formats:
        writer_vocab = vocabulary if label_map is None else label_map.mapped_vocabulary(vocabulary).vocab
        try:
            check_labels_vocabulary(writer_vocab)
        except ValueError as exc:
            raise fail(str(exc)) from None


def _warn_no_things(vocabulary: Any, tasks: tuple[str, ...], keep_stuff: bool) -> None:
    """Say why --task instance would find nothing: a vocabulary of stuff classes only."""
    if "instance" in tasks and not keep_stuff and len(vocabulary) and not any(vocabulary.isthing):
        err.print("warning: the vocabulary has only stuff classes, so --task instance finds nothing (instances are "
                  "things); mark classes [thing] or add --instance-keep-stuff", highlight=False, soft_wrap=True)


def _check_label_map(label_map: Any, vocabulary: Any) -> None:
    """Exit 2 (naming the file) when the label map does not fit the vocabulary."""
    if label_map is not None:
        try:
            label_map.mapped_vocabulary(vocabulary)
        except ValueError as exc:
            raise fail(str(exc)) from None


# Labelling-tool format flags (each is a shortcut for one --option), shared by segment and export.
_LS_REGIONS = typer.Option(None, "--ls-regions", help="label-studio: brush (exact RLE, default) or polygon regions.")
_COCO_MASKS = typer.Option(None, "--coco-masks", help="coco: rle (exact, default) or polygon (holes filled).")
_LAYOUT = typer.Option(None, "--layout", help="coco: flat (instances.json, default) or cvat (CVAT's COCO 1.0 folder "
                       "with annotations/instances_default.json and the images copied into images/default/).")
_IMAGE_ROOT = typer.Option(None, "--image-root", help="label-studio: how tasks reference images: a URL prefix, a "
                           "path prefix, or Label Studio's /data/local-files/?d= (default).")


@app.command("segment")
def segment_command(
    source: str = typer.Argument(
        ..., help="Image file, folder, glob ('shots/*.jpg'), list file (.txt), video, or - for paths on stdin."
    ),
    vocab: str | None = typer.Option(
        None, "--vocab", "-v", help="Classes: a file, a preset name or an inline 'a; b, synonym; c \\[stuff]' list. "
        "Default: the vocabulary stored in the model."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (resumable). Omit with --format jsonl "
                                    "to stream JSON lines to stdout."),
    model: str = typer.Option("masqclip-coco", "--model", "-m", help="Registered model (see `masqclip models`), "
                              "our .safetensors file or an official .pth checkpoint. `demo` ships with masqclip "
                              "but knows only the synthetic shapes world; for real images convert an official "
                              "checkpoint (`masqclip convert`) or use one you trained."),
    task: str = typer.Option("panoptic", help="Comma list of panoptic, semantic, instance (one model pass)."),
    fmt: str | None = typer.Option(None, "--format", "-f", help="Comma list of coco, panoptic, labels, overlay, "
                                   "jsonl, cvat, label-studio, labelme, yolo-seg, voc (docs/formats.md). Default: one "
                                   "per task (instance→coco, panoptic→panoptic, semantic→labels)."),
    batch_size: int = typer.Option(1, min=1, help="Images per model call (results identical to batch 1)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for torch (default: torch's choice)."),
    short_side: int | None = typer.Option(None, help="Resize the short side to this before the model (0: keep). "
                                          "Default: the model's own test size when its file has one (demo: 128), "
                                          "else 640."),
    max_size: int | None = typer.Option(None, help="Cap on the long side after resizing (default: the model's, "
                                        "else 2560)."),
    object_threshold: float | None = typer.Option(None, help="Panoptic: keep queries whose best p_cls exceeds this. "
                                                  "Default: the model's stored threshold (0.3 unless its file says)."),
    overlap_threshold: float | None = typer.Option(None, help="Panoptic: drop segments keeping less of their mask "
                                                   "than this. Default: the model's (0.3)."),
    topk: int | None = typer.Option(None, help="Instance: detections per image (clamped to queries × classes). "
                                    "Default: the model's (100)."),
    instance_keep_stuff: bool = typer.Option(False, help="Instance: keep stuff classes too (default: things only "
                                             "when the vocabulary has stuff)."),
    semantic_order: str = typer.Option("padded", help="Semantic: 'padded' (score map at the padded size, then "
                                       "resized; official semantic configs) or 'resized' (masks resized first)."),
    no_object_score: bool = typer.Option(False, help="Classify with p_clip alone (the paper's Table 3 ablation)."),
    templates: str | None = typer.Option(None, help="Prompt templates: none (bare names, default), vild, or a file."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    ext: str | None = typer.Option(None, help="Comma list of image extensions to take from folders."),
    every: int = typer.Option(1, min=1, help="Video: take every N-th frame."),
    start: float | None = typer.Option(None, help="Video: start time in seconds."),
    end: float | None = typer.Option(None, help="Video: end time in seconds."),
    max_pixels: int = typer.Option(64_000_000, min=0, help="Skip images larger than this many pixels (width x "
                                   "height), checked from the header before decoding; 0: no budget. A run peaks "
                                   "at about 5.5 GiB at the default 64 megapixels."),
    track: bool | None = typer.Option(None, "--track/--no-track", help="Give each object one id across the frames "
                                      "of a video (default: on for video sources)."),
    sequence: bool = typer.Option(False, "--sequence", help="Track across the images too: every image of the run "
                                  "is a frame of one sequence, in item-id order."),
    track_max_gap: int = typer.Option(5, min=0, help="Tracking: frames an object may go unseen and keep its id."),
    track_embeddings: bool = typer.Option(True, "--track-embeddings/--no-track-embeddings", help="Tracking: match "
                                          "by MasQCLIP's mask-token embeddings as well as mask IoU."),
    shard: str | None = typer.Option(None, help="Process shard i of n (i/n); under torchrun from RANK/WORLD_SIZE."),
    overwrite: bool = typer.Option(False, help="Replace outputs of a run with other options in --out."),
    palette: bool = typer.Option(False, help="labels: also write colour palette PNGs."),
    min_score: float | None = _MIN_SCORE,
    min_area: float | None = _MIN_AREA,
    max_per_image: int | None = _MAX_PER_IMAGE,
    one_label_per_mask: bool = _ONE_LABEL_PER_MASK,
    label_map_file: Path | None = _LABEL_MAP,
    coco_masks: str | None = _COCO_MASKS,
    layout: str | None = _LAYOUT,
    ls_regions: str | None = _LS_REGIONS,
    image_root: str | None = _IMAGE_ROOT,
    writer_option: list[str] = typer.Option([], "--option", help="A format's option as key=value (repeatable), "
                                            "e.g. cvat_shapes=polygon, labelme_shapes=mask, yolo_images=symlink, "
                                            "voc_objects=things; see docs/formats.md."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model (the first "
                                  "batches of each image size are slow while it compiles; outputs equal eager "
                                  "within float rounding). If compiling fails: a warning and the eager path."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Image decoding threads (default: min(4, "
                                       "CPUs)). Outputs and their order do not depend on it."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray: decode tasks and a pool of "
                               "model workers on a Ray cluster (pip install 'masqclip[ray]'; images only; --out must "
                               "be a folder every node sees). Same outputs, resume and fingerprint either way."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="--engine ray: the cluster (auto: the one "
                                           "`ray start` made; ray://host:10001). Default: $RAY_ADDRESS, else a Ray "
                                           "instance started for this run."),
    ray_workers: str = typer.Option("1", "--ray-workers", help="--engine ray: model workers, N or MIN-MAX "
                                    "(autoscaling between them)."),
    ray_gpus_per_worker: float = typer.Option(0.0, "--ray-gpus-per-worker", min=0, help="--engine ray: GPUs per "
                                              "model worker (a fraction shares a GPU; 0: CPU workers)."),
    ray_cpus_per_worker: float = typer.Option(1.0, "--ray-cpus-per-worker", min=0, help="--engine ray: CPUs per "
                                              "model worker (also its torch threads, unless --threads)."),
) -> None:
    """Segment images, folders, lists and videos; write COCO JSON, panoptic PNGs, label maps, overlays or JSONL.

    Resumable: finished items in --out are not computed again. Exit codes: 0 all done, 1 some items skipped or
    failed, 2 usage or model error, 130 interrupted (what was done is kept and assembled).
    """
    from masqclip_cli.inference.engine import FingerprintMismatchError, RunOptions, segment
    from masqclip_cli.inference.predictor import postprocess_config
    from masqclip_cli.inference.preprocess import test_size_of
    from masqclip_cli.inference.tracking import TrackerConfig
    from masqclip_cli.inference.video_tracks import TrackingOptions
    from masqclip_cli.io.run_lock import RunLockedError
    from masqclip_cli.io.sources import SourceError
    from masqclip_cli.io.writers import WRITERS, default_formats, missing_tasks
    from masqclip_cli.modeling.checkpoint import ModelFileError
    from masqclip_cli.modeling.clip_loader import WeightsNotFoundError
    from masqclip_cli.modeling.factory import ModelNotAvailableError, load_model, model_identity
    from masqclip_cli.modeling.text import TextEmbeddingCache
    from masqclip_cli.vocab import VocabularyError, load_vocabulary, read_templates

    tasks = _split_list(task, "task", TASKS)
    formats = _split_list(fmt, "format", tuple(WRITERS)) if fmt else default_formats(tasks)
    for name, absent in missing_tasks(formats, tasks).items():  # before the model loads
        raise fail(f"--format {name} needs --task {' or '.join(absent)} (add it to --task)")
    _check_numbers(object_threshold=object_threshold, overlap_threshold=overlap_threshold, topk=topk,
                   short_side=short_side, max_size=max_size)
    ray_options = _ray_options(engine, source, out, track, sequence, device, ray_address, ray_workers,
                               ray_gpus_per_worker, ray_cpus_per_worker)
    # under Ray the model runs on the workers: the device is theirs (the driver reads the model on its CPU)
    picked_device = _check_device(device) if ray_options is None else "cpu"
    writer_options = _writer_options(writer_option, palette=palette or None, ls_regions=ls_regions,
                                     ls_image_root=image_root, coco_masks=coco_masks, coco_layout=layout)
    controls = _preannotation(min_score, min_area, max_per_image, one_label_per_mask)
    label_map = _label_map(label_map_file)
    if out is None and formats != ("jsonl",):
        raise fail("--out is required (only --format jsonl can stream to stdout without it)")
    if semantic_order not in ("padded", "resized"):
        raise fail("--semantic-order: use padded or resized")
    if precision not in ("fp32", "bf16", "fp16"):
        raise fail("--precision: use fp32, bf16 or fp16")
    shard_spec = _parse_shard(shard)
    if shard is None and shard_spec[1] > 1 and out is not None:  # under torchrun: one folder per process
        out = out / f"shard-{shard_spec[0]:03d}-of-{shard_spec[1]:03d}"
    try:
        template_list = read_templates(templates)
        vocabulary = load_vocabulary(vocab) if vocab is not None else None
    except VocabularyError as exc:
        raise fail(str(exc)) from None
    if vocabulary is not None:
        _check_label_map(label_map, vocabulary)  # before the model loads
        _check_labels_ids(formats, label_map, vocabulary)
        _warn_no_things(vocabulary, tasks, instance_keep_stuff)

    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        net = load_model(model, device=picked_device, precision=precision)
        model_id = model_identity(model)
    except (ModelNotAvailableError, ModelFileError, WeightsNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    net.use_object_score = not no_object_score
    if compile_:
        from masqclip_cli.modeling.runtime import compile_model

        compile_model(net, on_fallback=lambda message: err.print(f"warning: {message}", highlight=False,
                                                                 soft_wrap=True))
    own_size = test_size_of(net)
    short_side = short_side if short_side is not None else own_size["short_side"]
    max_size = max_size if max_size is not None else own_size["max_size"]
    if vocabulary is None:
        if net.vocabulary is None:
            raise fail(f"model '{model}' stores no vocabulary: give one with --vocab")
        vocabulary = net.vocabulary
        _check_label_map(label_map, vocabulary)
        _check_labels_ids(formats, label_map, vocabulary)
        _warn_no_things(vocabulary, tasks, instance_keep_stuff)
    elif ray_options is not None:  # each worker encodes it as below (cached); the driver needs no text bank
        if net.text_encoder is None:
            raise fail(f"model '{model}' has no text tower: it can only use the vocabulary stored with it")
    else:
        try:
            net.set_vocabulary(vocabulary, templates=template_list, cache=TextEmbeddingCache(),
                               progress=len(vocabulary) > 200)
        except ValueError as exc:
            raise fail(str(exc)) from None
    options = RunOptions(
        formats=formats,
        postprocess=postprocess_config(net, tasks, object_mask_threshold=object_threshold,
                                       overlap_threshold=overlap_threshold, detections_per_image=topk,
                                       semantic_order=semantic_order, instance_keep_stuff=instance_keep_stuff),
        batch_size=batch_size, short_side=short_side, max_size=max_size, shard=shard_spec, overwrite=overwrite,
        recursive=recursive, extensions=tuple(f".{e.lstrip('.')}" for e in _split_list(ext, "ext")) if ext else None,
        every=every, start=start, end=end,
        writer_options=writer_options | ({"stream": sys.stdout} if out is None else {}),
        preannotation=controls,
        label_map=label_map,
        max_pixels=max_pixels or None,
        workers=workers,
        compile=compile_,
        tracking=TrackingOptions(track=track, sequence=sequence,
                                 config=TrackerConfig(max_gap=track_max_gap, use_embeddings=track_embeddings)),
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("segment"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"),
                        TimeRemainingColumn(), console=err, transient=True)
    bar = progress.add_task("segment", total=None, rate="")
    started = time.perf_counter()

    def on_item(item_id: str, finished: int, total: int | None) -> None:
        rate = finished / max(time.perf_counter() - started, 1e-9)
        progress.update(bar, completed=finished, total=total, rate=f"{rate:.2f} items/s")

    try:
        with progress:
            if ray_options is not None:
                from masqclip_cli.inference.ray_engine import ModelSpec, RayEngineError, segment_ray

                spec = ModelSpec(source=str(Path(model).resolve()) if Path(model).exists() else model,
                                 device=device.strip().lower(), precision=precision,
                                 use_object_score=net.use_object_score,
                                 vocabulary=None if vocab is None else vocabulary,
                                 templates=None if template_list is None else tuple(template_list), threads=threads)
                del net  # the workers load their own
                try:
                    summary = segment_ray(spec, vocabulary, source, out, options, model_id, ray_options,
                                          on_item=on_item, stdin=sys.stdin)
                except RayEngineError as exc:
                    raise fail(f"--engine ray: {exc}") from None
            else:
                summary = segment(net, vocabulary, source, out, options, model_id, templates=template_list,
                                  precision=precision, on_item=on_item, stdin=sys.stdin)
    except (FingerprintMismatchError, SourceError, RunLockedError) as exc:
        raise fail(str(exc).replace("overwrite=True replaces them; or use another output folder",
                                    "use --overwrite to replace them, or another --out")) from None
    _print_summary(summary)
    raise typer.Exit(summary.exit_code)


def _ray_options(engine: str, source: str, out: Path | None, track: bool | None, sequence: bool, device: str,
                 address: str | None, workers: str, gpus: float, cpus: float) -> Any:
    """The Ray engine's options (None for ``--engine local``), checked before the model loads: exit 2 with one line
    for Ray missing, a run it does not do, or a bad value."""
    name = engine.strip().lower()
    if name == "local":
        return None
    if name != "ray":
        raise fail(f"--engine: use local or ray, got {engine!r}")
    from masqclip_cli.inference.ray_engine import RayNotInstalledError, RayOptions, parse_workers, require_ray
    from masqclip_cli.io.sources import SourceError, spec_kind

    try:
        require_ray()
    except RayNotInstalledError:
        raise fail("--engine ray needs Ray: pip install 'masqclip\\[ray]'") from None  # \[: not rich markup
    if out is None:
        raise fail("--engine ray needs --out (a folder every node of the cluster sees)")
    try:
        video = spec_kind(source) == "video"
    except SourceError as exc:  # as the local engine reports it
        raise fail(str(exc)) from None
    if sequence or track or video:
        raise fail("--engine ray runs images only: tracked sequences and videos (--track, --sequence, a video "
                   "source) need --engine local")
    try:
        pool = parse_workers(workers)
    except ValueError as exc:
        raise fail(f"--ray-workers: {exc}") from None
    kind, _, index = device.strip().lower().partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise fail(f"--device: unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    if index:
        raise fail(f"--device {device} with --engine ray: Ray gives each worker its GPUs (use --device cuda or auto "
                   "with --ray-gpus-per-worker)")
    if kind == "cuda" and gpus <= 0:
        raise fail(f"--device {device} with --engine ray needs --ray-gpus-per-worker > 0 (Ray gives each worker its "
                   "GPUs)")
    return RayOptions(address=address, workers=pool, gpus_per_worker=gpus, cpus_per_worker=cpus)


def _print_summary(summary) -> None:  # noqa: ANN001 - RunSummary
    done = f"{summary.done} done"
    if summary.reused:
        done += f", {summary.reused} already done (resumed)"
    err.print(
        f"{done}, {len(summary.skipped)} skipped, {len(summary.failed)} failed in {summary.wall_s:.1f} s "
        f"({summary.items_per_s:.2f} items/s; decode {summary.seconds['decode']:.1f} s, model "
        f"{summary.seconds['model']:.1f} s, post-process {summary.seconds['postprocess']:.1f} s, write "
        f"{summary.seconds['write']:.1f} s)",
        highlight=False,
        soft_wrap=True,
    )
    for _, reason in summary.skipped:
        err.print(f"skipped: {reason}", highlight=False, soft_wrap=True)
    for _, reason in summary.failed:
        err.print(f"failed: {reason}", highlight=False, soft_wrap=True)
    if summary.interrupted and summary.unassembled:
        err.print(f"interrupted during assembly: finished items were kept; not assembled: "
                  f"{', '.join(summary.unassembled)} (run again to assemble them)", highlight=False, soft_wrap=True)
    elif summary.interrupted:
        err.print("interrupted: finished items were kept and assembled; run again to resume", highlight=False,
                  soft_wrap=True)
    elif summary.unassembled:
        err.print(f"not assembled: {', '.join(summary.unassembled)}", highlight=False, soft_wrap=True)
    if summary.fatal is not None:
        err.print(f"[bold red]error:[/] {summary.fatal} (run stopped; what was written before is intact, run "
                  "again to resume)", highlight=False, soft_wrap=True)


@app.command("export")
def export_command(
    run: Path = typer.Argument(..., help="The --out folder of a finished `masqclip segment` run."),
    fmt: str = typer.Option(..., "--format", "-f", help="Comma list of formats to write (any `segment` writes)."),
    out: Path = typer.Option(..., "--out", "-o", help="A new folder for the exported files."),
    min_score: float | None = _MIN_SCORE,
    min_area: float | None = _MIN_AREA,
    max_per_image: int | None = _MAX_PER_IMAGE,
    one_label_per_mask: bool = _ONE_LABEL_PER_MASK,
    label_map_file: Path | None = _LABEL_MAP,
    coco_masks: str | None = _COCO_MASKS,
    layout: str | None = _LAYOUT,
    ls_regions: str | None = _LS_REGIONS,
    image_root: str | None = _IMAGE_ROOT,
    palette: bool = typer.Option(False, help="labels: also write colour palette PNGs."),
    writer_option: list[str] = typer.Option([], "--option", help="A format's option as key=value (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier export with other options in --out."),
) -> None:
    """Write any format from a finished segment run, without the model (from the results the run kept).

    Exporting a run's own format with its own options reproduces its files byte for byte. Exit codes: 0 all
    exported, 1 some items failed, 2 usage error or not a run.
    """
    from masqclip_cli.inference.engine import FingerprintMismatchError
    from masqclip_cli.inference.export import export_run
    from masqclip_cli.inference.label_map import LabelMapError
    from masqclip_cli.io.run_lock import RunLockedError
    from masqclip_cli.io.writers import WRITERS

    formats = _split_list(fmt, "format", tuple(WRITERS))
    options = _writer_options(writer_option, palette=palette or None, ls_regions=ls_regions,
                              ls_image_root=image_root, coco_masks=coco_masks, coco_layout=layout)
    controls = _preannotation(min_score, min_area, max_per_image, one_label_per_mask)
    label_map = _label_map(label_map_file)
    try:
        summary = export_run(run, out, formats, writer_options=options, preannotation=controls, label_map=label_map,
                             overwrite=overwrite)
    except (LabelMapError, RunLockedError) as exc:
        raise fail(str(exc)) from None
    except FingerprintMismatchError as exc:
        raise fail(str(exc).replace("overwrite=True replaces them; or use another output folder",
                                    "use --overwrite to replace them, or another --out")) from None
    except ValueError as exc:
        raise fail(f"--format: {exc}") from None
    err.print(f"{summary.done} exported, {len(summary.failed)} failed into {out} "
              f"({len(summary.written)} run-level files)", highlight=False)
    for _, reason in summary.failed:
        err.print(f"failed: {reason}", highlight=False, soft_wrap=True)
    raise typer.Exit(summary.exit_code)


@app.command("merge")
def merge_command(
    shards: list[Path] = typer.Argument(..., help="The --out folders of the shards (all of them)."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged output folder."),
    allow_partial: bool = typer.Option(False, help="Merge shards whose runs did not finish (their missing items "
                                       "are left out)."),
) -> None:
    """Join the outputs of `segment --shard i/n` runs into one set, equal to a single run's."""
    from masqclip_cli.inference.engine import FingerprintMismatchError, incomplete_shards, merge_outputs
    from masqclip_cli.io.run_lock import RunLockedError
    from masqclip_cli.vocab import Vocabulary

    problems = incomplete_shards(shards)
    for line in problems:
        err.print(f"{'warning' if allow_partial else 'error'}: {line}", highlight=False, soft_wrap=True)
    if problems and not allow_partial:
        raise fail(f"{len(problems)} of {len(shards)} shards are incomplete: complete them, or merge with "
                   "--allow-partial")
    try:
        fingerprint = json.loads((shards[0] / ".masqclip" / "run.json").read_text())
        vocabulary = Vocabulary.from_json(fingerprint["vocabulary"], source=f"{shards[0]}/.masqclip/run.json")
        written = merge_outputs(shards, out, vocabulary, tuple(fingerprint["formats"]),
                                fingerprint.get("writer_options") or {})
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise fail(f"{shards[0]}: not a masqclip segment output ({exc})") from None
    except (FingerprintMismatchError, RunLockedError) as exc:
        raise fail(str(exc)) from None
    err.print(f"merged {len(shards)} shards into {out} ({len(written)} run-level files)", highlight=False)


def _init_distributed(device: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


@app.command("eval")
def eval_command(
    dataset: str = typer.Option(..., "--dataset", "-d", help="coco-panoptic, ade20k-panoptic, ade20k-150, ade20k-847, "
                                "pascal-context-59/459, coco-instance-65/48/17, synthetic, generic-semantic, "
                                "generic-panoptic, generic-instance."),
    root: Path | None = typer.Option(None, help="Folder holding the datasets in their standard layouts."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model to evaluate (default masqclip-coco)."),
    predictions: Path | None = typer.Option(None, help="Score the --out folder of a `masqclip segment` run "
                                            "instead of running a model."),
    task: str | None = typer.Option(None, help="Comma list of panoptic, semantic, instance (default: the "
                                    "dataset's own task)."),
    images: Path | None = typer.Option(None, help="Override: image folder."),
    labels: Path | None = typer.Option(None, help="Override: semantic label folder."),
    panoptic_json: Path | None = typer.Option(None, help="Override: COCO panoptic JSON."),
    panoptic_dir: Path | None = typer.Option(None, help="Override: panoptic PNG folder."),
    annotations: Path | None = typer.Option(None, help="Override: COCO instance JSON."),
    vocab: str | None = typer.Option(None, help="Override: the dataset's vocabulary (generic datasets)."),
    split: str | None = typer.Option(None, help="synthetic: the split folder (default val)."),
    ignore_label: int | None = typer.Option(None, help="Override: ignore value of semantic labels."),
    templates: str | None = typer.Option(None, help="Prompt templates: none (default), vild, or a file."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for torch."),
    batch_size: int = typer.Option(1, min=1, help="Images per model call."),
    short_side: int | None = typer.Option(None, help="Override the dataset's test short side."),
    max_size: int | None = typer.Option(None, help="Override the dataset's test long-side cap."),
    object_threshold: float | None = typer.Option(None, help="Panoptic object-mask threshold (default: the "
                                                  "model's, 0.3 unless its file says)."),
    overlap_threshold: float | None = typer.Option(None, help="Panoptic overlap threshold (default: the model's)."),
    topk: int | None = typer.Option(None, help="Instance detections per image (default: the model's)."),
    semantic_order: str = typer.Option("padded", help="padded or resized (see segment --help)."),
    instance_keep_stuff: bool = typer.Option(False, help="Instance: keep stuff classes too."),
    no_object_score: bool = typer.Option(False, help="Classify with p_clip alone (Table 3 ablation)."),
    limit: int | None = typer.Option(None, min=1, help="Evaluate the first N images only."),
    report: Path | None = typer.Option(None, help="Write the JSON report here (the numbers with their protocol)."),
    track_mode: str = typer.Option("iou+embedding", help="synthetic-video with --model: frame (no tracking), iou "
                                   "or iou+embedding."),
    track_max_gap: int = typer.Option(5, min=0, help="synthetic-video with --model: the tracker's max gap."),
    work: Path | None = typer.Option(None, help="synthetic-video with --model: keep the runs here (resumable; "
                                     "default a temporary folder)."),
) -> None:
    """Evaluate a model, or the files `masqclip segment` wrote, on a dataset: PQ / mIoU / mask AP; on videos
    (synthetic-video, mots) tracking: HOTA / DetA / AssA / IDF1 / MOTA / ID switches by TrackEval.

    Prints a table and, with --report, a JSON file recording the protocol next to every number. Under torchrun the
    samples are split over the processes and the metrics are those of one process.
    """
    if dataset in ("synthetic-video", "mots"):
        _eval_tracking(dataset, root, model, predictions, report, track_mode=track_mode, track_max_gap=track_max_gap,
                       work=work, device=device, threads=threads, batch_size=batch_size)
        return
    from masqclip_cli.data.datasets import DatasetError, load_dataset
    from masqclip_cli.evaluation.runner import EvalError, EvalOptions, evaluate, report_protocol, write_report
    from masqclip_cli.inference.postprocess import PostprocessConfig
    from masqclip_cli.inference.predictor import postprocess_config
    from masqclip_cli.modeling.factory import DEFAULT_MODEL
    from masqclip_cli.vocab import VocabularyError, read_templates

    overrides = {k: v for k, v in {"images": images, "labels": labels, "panoptic_json": panoptic_json,
                                   "panoptic_dir": panoptic_dir, "annotations": annotations, "vocab": vocab,
                                   "split": split, "ignore_label": ignore_label}.items() if v is not None}
    try:
        data = load_dataset(dataset, root, **overrides)
        template_list = read_templates(templates)
    except (DatasetError, VocabularyError) as exc:
        raise fail(str(exc)) from None
    tasks = _split_list(task, "task", TASKS) if task else (data.task,)
    thresholds = {"object_mask_threshold": object_threshold, "overlap_threshold": overlap_threshold,
                  "detections_per_image": topk, "semantic_order": semantic_order,
                  "instance_keep_stuff": instance_keep_stuff}
    net = None
    model_name = None
    _check_numbers(object_threshold=object_threshold, overlap_threshold=overlap_threshold, topk=topk,
                   short_side=short_side, max_size=max_size)
    picked = _check_device(device)
    if predictions is None:
        import torch

        from masqclip_cli.modeling.checkpoint import ModelFileError
        from masqclip_cli.modeling.clip_loader import WeightsNotFoundError
        from masqclip_cli.modeling.factory import ModelNotAvailableError, load_model, model_identity
        from masqclip_cli.modeling.text import TextEmbeddingCache

        if threads:
            torch.set_num_threads(threads)
        model_name = model or DEFAULT_MODEL
        try:
            net = load_model(model_name, device=picked, precision=precision)
            model_id = model_identity(model_name)
            net.use_object_score = not no_object_score
            net.set_vocabulary(data.vocabulary, templates=template_list, cache=TextEmbeddingCache())
        except (ModelNotAvailableError, ModelFileError, WeightsNotFoundError, ValueError) as exc:
            raise fail(str(exc)) from None
    elif model is not None:
        raise fail("give --model or --predictions, not both")
    try:
        config = postprocess_config(net, tasks, **thresholds) if net is not None else PostprocessConfig(
            tasks=tasks, **{k: v for k, v in thresholds.items() if v is not None})
    except ValueError as exc:
        raise fail(str(exc)) from None
    options = EvalOptions(tasks=tasks, postprocess=config, short_side=short_side, max_size=max_size,
                          batch_size=batch_size, limit=limit)
    distributed = _init_distributed(picked)
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    try:
        result = evaluate(data, options, model=net, predictions=predictions)
    except (EvalError, DatasetError) as exc:
        raise fail(str(exc)) from None
    if rank != 0:
        return
    protocol = report_protocol(
        data, options,
        model=model_name, model_identity=model_id if net is not None else None,
        predictions=str(predictions) if predictions else None,
        templates=template_list, object_score=not no_object_score,
        device=picked if net is not None else None, precision=precision if net is not None else None,
    )
    full = {"protocol": protocol, **result}
    _print_metrics(full)
    if report is not None:
        write_report(report, full)
        err.print(f"report: {report}", highlight=False)


def _eval_tracking(dataset: str, root: Path | None, model: str | None, predictions: Path | None,
                   report: Path | None, *, track_mode: str, track_max_gap: int, work: Path | None, device: str,
                   threads: int | None, batch_size: int) -> None:
    """`eval --dataset synthetic-video|mots`: tracking metrics of a model (synthetic videos) or of segment runs."""
    import tempfile

    from masqclip_cli.evaluation.runner import write_report
    from masqclip_cli.evaluation.tracking import evaluate_tracking
    from masqclip_cli.evaluation.video import TRACK_MODES, evaluate_video_model, evaluate_video_run

    if root is None:
        raise fail(f"--dataset {dataset} needs --root (the ground truth: a `masqclip synth --video` folder"
                   + (")" if dataset == "synthetic-video" else ", or a folder of MOTS <sequence>.txt files)"))
    if (model is None) == (predictions is None):
        raise fail("give --model (synthetic-video only) or --predictions (segment runs with --format mots)")
    try:
        if predictions is not None and dataset == "mots":
            result = evaluate_tracking(root, predictions / "mots" if (predictions / "mots").is_dir() else predictions)
        elif predictions is not None:
            result = evaluate_video_run(root, predictions)
        else:
            if dataset != "synthetic-video":
                raise fail("--model needs --dataset synthetic-video (for MOTS ground truth, score segment runs "
                           "with --predictions)")
            if track_mode not in TRACK_MODES:
                raise fail(f"--track-mode: use {', '.join(TRACK_MODES)}")
            import torch

            from masqclip_cli.inference.tracking import TrackerConfig
            from masqclip_cli.modeling.factory import load_model, model_identity

            if threads:
                torch.set_num_threads(threads)
            net = load_model(model, device=_check_device(device))
            with tempfile.TemporaryDirectory() as scratch:
                result = evaluate_video_model(root, net, None, track_mode, work or Path(scratch),
                                              tracker_config=TrackerConfig(max_gap=track_max_gap),
                                              model_id=model_identity(model), batch_size=batch_size)
    except (ValueError, OSError) as exc:
        raise fail(str(exc).splitlines()[0]) from None
    table = Table(title=f"{dataset}: tracking")
    for column in ("metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for key in ("HOTA", "DetA", "AssA", "IDF1", "MOTA", "IDSW"):
        value = result.get(key)
        table.add_row(key, "-" if value is None else (f"{value:.2f}" if key != "IDSW" else str(value)))
    out.print(table)
    if report is not None:
        write_report(report, result)
        err.print(f"report: {report}", highlight=False)


def _print_metrics(report: dict) -> None:
    metrics = report["metrics"]
    per_image = report["seconds_model_per_image"]
    title = (f"{report['protocol']['dataset']}: {report['images']} images, {report['seconds_total']:.1f} s"
             + (f", model {per_image:.3f} s/image" if per_image else ""))
    table = Table(title=title)
    for column in ("task", "split", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    keys = {"panoptic": ("pq", "sq", "rq"), "semantic": ("mIoU", "fwIoU", "pACC", "mACC"),
            "instance": ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    for task_name, values in metrics.items():
        for split_name, block in values.items():
            if not isinstance(block, dict) or split_name == "per_class":
                continue
            for key in keys[task_name]:
                if key in block and block[key] is not None:
                    table.add_row(task_name, split_name, key, f"{block[key]:.2f}")
        if task_name in ("semantic", "instance"):
            for key in keys[task_name]:
                if key in values and not isinstance(values[key], dict):
                    table.add_row(task_name, "all", key, f"{values[key]:.2f}")
    out.print(table)


@app.command("synth")
def synth_command(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (or add a split to)."),
    split: str = typer.Option("val", help="Split name (train, val, ...)."),
    images: int | None = typer.Option(None, min=1, help="Number of scenes (default 200; with --video: of videos, "
                                      "default 8)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives a byte-identical dataset."),
    size: int | None = typer.Option(None, min=32, help="Image side in pixels (default 256; videos 128)."),
    video: bool = typer.Option(False, "--video", help="Write videos of moving shapes with MOTS ground truth "
                               "(track ids) instead of still scenes (docs/formats.md, synthetic video dataset)."),
    frames: int = typer.Option(48, min=2, help="--video: frames per video."),
    novel: str | None = typer.Option(None, help="Comma list of novel categories (default: the generator's)."),
    base_only: bool = typer.Option(False, help="Leave novel categories unannotated (a base-only training split)."),
    crops: bool = typer.Option(True, help="Also write per-object crops with captions (for training a small CLIP)."),
) -> None:
    """Generate the synthetic shapes world: images, COCO panoptic + instances, label maps, vocabulary, captions;
    or, with --video, videos of moving shapes with MOTS ground truth."""
    from masqclip_cli.data.synthetic import DEFAULT_NOVEL, SynthConfig, generate

    if video:
        from masqclip_cli.data.synthetic_video import VideoConfig, generate_videos

        count = images or 8
        side = size or 128
        try:
            manifest = generate_videos(VideoConfig(seed=seed, num_videos=count, frames=frames, size=(side, side)),
                                       out_dir)
        except (ValueError, TypeError) as exc:
            raise fail(str(exc)) from None
        err.print(f"wrote {len(manifest['videos'])} videos of {frames} frames ({side}x{side}) to {out_dir}",
                  highlight=False)
        return
    size = size or 256
    images = images or 200
    config = SynthConfig(images=images, seed=seed, split=split, size=(size, size),
                         novel=tuple(_split_list(novel, "novel")) if novel else DEFAULT_NOVEL,
                         base_only=base_only, crops=crops)
    try:
        summary = generate(out_dir, config)
    except ValueError as exc:
        raise fail(str(exc)) from None
    err.print(f"wrote {images} {split} scenes to {out_dir}: " + json.dumps(summary, default=str)[:300],
              highlight=False)


@app.command("train", context_settings={"help_option_names": ["-h", "--help"]})
def train_command(
    stage: str = typer.Argument(..., help="proposals (class-agnostic teacher), distill (progressive distillation) "
                                "or masq (MasQ-tuning)."),
    config_file: Path | None = typer.Option(None, "--config", "-c", help="TOML config file (see configs/)."),
    overrides: list[str] = typer.Option([], "--set", help="Override any config setting: --set key=value "
                                        "(repeatable; e.g. --set lr_steps=[0.9] --set num_points=12544)."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Run folder (checkpoint.pt, metrics.jsonl, "
                                        "final.safetensors); an existing run there is resumed."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Training dataset (any `masqclip eval` "
                                       "dataset; default coco-panoptic)."),
    root: Path | None = typer.Option(None, help="Folder holding the datasets (for synthetic: the `masqclip synth` "
                                     "folder)."),
    split: str | None = typer.Option(None, help="Synthetic datasets: the split to train on (default train)."),
    classes: str | None = typer.Option(None, help="auto, all or base: with a base/novel split, auto trains on the "
                                       "base classes only."),
    proposals: str | None = typer.Option(None, "--proposals", help="proposals stage: the proposal-network config "
                                         "(m2f-r50, tiny, or a JSON file); masq stage: the model file whose "
                                         "proposal network is used (the distilled student)."),
    init: str | None = typer.Option(None, help="proposals stage: start from this model file's proposal network."),
    backbone_weights: Path | None = typer.Option(None, help="ImageNet ResNet weights (a torchvision state_dict) "
                                                 "for the backbone."),
    teacher: str | None = typer.Option(None, help="distill: the teacher model file (a `train proposals` result)."),
    rounds: int | None = typer.Option(None, help="distill: rounds K (default 2); the student becomes the teacher."),
    overlap: str | None = typer.Option(None, help="distill: dice (default), iou or dice-points."),
    clip: str | None = typer.Option(None, help="open_clip model name, a JSON config file, or `tiny` (default: the "
                                    "teacher's / proposal file's CLIP, else ViT-L-14-336-quickgelu)."),
    clip_weights: str | None = typer.Option(None, help="open_clip pretrained tag or weights file for --clip "
                                            "(default openai for the official CLIP; nothing is downloaded unless "
                                            "MASQCLIP_ALLOW_DOWNLOAD=1)."),
    tune: str | None = typer.Option(None, help="masq: what to tune: q (MasQCLIP), k, v, qk, qkv or clip."),
    tie_mask_embeddings: bool | None = typer.Option(None, "--tie-mask-embeddings/--own-mask-embeddings",
                                                    help="masq: keep the mask position embedding = CLIP's CLS "
                                                    "position embedding (official code) instead of training it."),
    iterations: int | None = typer.Option(None, help="Iterations (per round for distill)."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Global batch size (split over "
                                          "torchrun processes)."),
    lr: float | None = typer.Option(None, help="Base learning rate."),
    augment: str | None = typer.Option(None, help="fixed (flip + resize to size², COCO-panoptic recipe), lsj "
                                       "(large-scale jitter + crop, COCO-instance recipe) or none."),
    size: int | None = typer.Option(None, help="Augmentation size (1024 in the official recipes)."),
    seed: int | None = typer.Option(None, help="Seed of data order, augmentation, point sampling and init."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda."),
    amp: str | None = typer.Option(None, help="auto (fp16 on CUDA), off, fp16, bf16."),
    workers: int | None = typer.Option(None, help="Data-loading processes."),
    checkpoint_every: int | None = typer.Option(None, help="Save checkpoint.pt every N iterations."),
    eval_every: int | None = typer.Option(None, help="Evaluate every N iterations (and at the end)."),
    eval_dataset: str | None = typer.Option(None, help="Dataset to evaluate on (proposal recall; PQ / mIoU / AP "
                                            "for masq)."),
    eval_root: Path | None = typer.Option(None, help="Root of the evaluation dataset (default --root)."),
    eval_split: str | None = typer.Option(None, help="Synthetic evaluation split (default val)."),
    eval_limit: int | None = typer.Option(None, help="Evaluate on the first N images only."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume from checkpoint.pt in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Train MasQCLIP: the class-agnostic teacher, progressive distillation, MasQ-tuning (docs/training.md).

    Runs on one CPU, one GPU, or many with `torchrun --nproc-per-node N -m masqclip_cli train ...`.
    """
    from masqclip_cli.training.config import ConfigError, load_config
    from masqclip_cli.training.loop import train

    options = {
        "out": str(out_dir) if out_dir else None, "dataset": dataset, "root": str(root) if root else None,
        "split": split, "classes": classes, "init": init, "teacher": teacher, "rounds": rounds,
        "backbone_weights": str(backbone_weights) if backbone_weights else None, "overlap": overlap,
        "clip": clip, "clip_weights": clip_weights, "tune": tune, "tie_mask_embeddings": tie_mask_embeddings,
        "iterations": iterations, "batch_size": batch_size, "lr": lr, "augment": augment, "size": size,
        "seed": seed, "device": device, "amp": amp, "workers": workers, "checkpoint_every": checkpoint_every,
        "eval_every": eval_every, "eval_dataset": eval_dataset, "eval_root": str(eval_root) if eval_root else None,
        "eval_split": eval_split, "eval_limit": eval_limit, "resume": resume if not resume else None,
    }
    if proposals is not None:
        options["init" if stage == "masq" else "proposals"] = proposals
    if stage == "masq" and init is not None:
        raise fail("train masq: give the proposal network with --proposals FILE")
    try:
        config = load_config(stage, config_file, overrides, options)
        from masqclip_cli.modeling.masq_visual import TUNE_MODES

        if config.tune not in TUNE_MODES:
            raise ConfigError(f"--tune must be one of {', '.join(TUNE_MODES)}, got {config.tune!r}")
        rank0 = int(os.environ.get("RANK", "0")) == 0
        t0 = time.perf_counter()
        result = train(config, console=None if quiet or not rank0 else err)
    except KeyboardInterrupt as exc:
        err.print(f"interrupted: {exc or 'stopped'}", highlight=False)
        raise typer.Exit(130) from None
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise fail(_as_flags(str(exc))) from None
    if rank0:
        seconds = time.perf_counter() - t0
        per_iter = f", {result.seconds_per_iteration:.3f} s/iteration" if result.seconds_per_iteration else ""
        err.print(f"{stage}: {result.iterations_run} iterations in {seconds:.1f} s{per_iter}; model: {result.final}",
                  highlight=False)


#: How the training library's setting names read on this command line (its messages name settings, not flags).
_SETTING_FLAGS = {"teacher=FILE": "--teacher FILE", "proposals=FILE": "--proposals FILE",
                  "resume=False": "--no-resume", "clip_weights=": "--clip-weights ", "clip=": "--clip ",
                  "override ": "--set "}


def _as_flags(message: str) -> str:
    for setting, flag in _SETTING_FLAGS.items():
        message = message.replace(setting, flag)
    return message


def main() -> None:
    """Console-script entry point."""
    app()
