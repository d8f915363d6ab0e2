"""The ``masqclip`` command line: a thin shell over the library (parse, call, report).

Errors in the input are one line on stderr (``error: <file>:<line>: <problem>``) and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from masqclip_cli import __version__

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


def main() -> None:
    """Console-script entry point."""
    app()
