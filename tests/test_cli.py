"""The command line: help texts, vocab show/presets, model info, error exits."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from masqclip_cli.cli import app

runner = CliRunner()


def test_help_teaches_what_to_type():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "vocab" in result.output and "open-vocabulary" in result.output.lower()
    result = runner.invoke(app, ["vocab", "--help"])
    assert result.exit_code == 0
    for word in ("show", "presets", "preset", "inline", "[stuff]"):
        assert word in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("masqclip ")


def test_vocab_show_file_lists_every_class(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("person, people\nsky: sky, clouds [stuff]\n")
    result = runner.invoke(app, ["vocab", "show", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "2 classes (1 thing, 1 stuff)" in result.output
    assert "person | people" in result.output and "sky | clouds" in result.output


def test_vocab_show_json_round_trips_inline():
    result = runner.invoke(app, ["vocab", "show", "--json", "person; car, automobile; road [stuff]"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [d["name"] for d in data] == ["person", "car", "road"]
    assert data[1]["synonyms"] == ["automobile"] and data[2]["isthing"] is False


def test_vocab_show_preset_and_presets_table():
    result = runner.invoke(app, ["vocab", "show", "--json", "coco-novel-17"])
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 17
    result = runner.invoke(app, ["vocab", "presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "ade20k-847" in result.output and "847" in result.output and "133" in result.output


def test_bad_vocabulary_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("car\ncar\n")
    result = runner.invoke(app, ["vocab", "show", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.txt:2" in lines[0] and "duplicate" in lines[0]
    result = runner.invoke(app, ["vocab", "show", "ade20k-15"])
    assert result.exit_code == 2 and "unknown preset" in result.stderr


def test_model_info_rejects_non_model_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not a model")
    result = runner.invoke(app, ["model", "info", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "x.safetensors" in result.stderr


def test_console_script_runs_as_module():
    done = subprocess.run([sys.executable, "-m", "masqclip_cli", "vocab", "show", "--json", "cat; dog"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and json.loads(done.stdout)[1]["name"] == "dog"
