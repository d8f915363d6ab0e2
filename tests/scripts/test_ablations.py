"""Smoke run of scripts/ablations.py on the shortened demo recipe: every row of the three tables runs through
`masqclip train` / `masqclip eval` and writes its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ablations_smoke_run_writes_every_row(demo_ci_build, tmp_path):
    demo_work, _ = demo_ci_build
    work = tmp_path / "ablations"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    docs_before = (REPO / "docs" / "ablations.md").read_bytes() if (REPO / "docs" / "ablations.md").exists() else None
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "ablations.py"), "--demo-work", str(demo_work),
                           "--work", str(work), "--smoke", "--no-docs"], env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((work / "ablations.json").read_text())
    assert result["smoke"] is True
    t3, t4, t5 = result["table3_object_score"], result["table4_distillation"], result["table5_tuning"]
    assert set(t3) == {"with p_obj", "without"}
    assert set(t4) == {"teacher", "1 round", "2 rounds", "teacher longer"}
    assert set(t5) == {"frozen", "q", "v", "qkv", "k"}
    for row in t3.values():
        assert isinstance(row["AP"]["all"], float) and isinstance(row["AP50"]["all"], float)
    for row in t4.values():
        assert isinstance(row["AP50"]["all"], float) and 0.0 <= row["recall@0.5"]["all"] <= 100.0
    for row in t5.values():
        for metric in ("PQ", "mIoU"):
            assert all(isinstance(row[metric][s], float) for s in ("all", "base")), row
    # every training and evaluation row was a real `masqclip` command that ran and was timed
    commands = result["commands"]
    assert sum(c.startswith("masqclip train masq") for c in commands.values()) == 6  # teacher, 1r, longer, v, qkv, k
    assert sum(c.startswith("masqclip eval") for c in commands.values()) == 9
    assert any("--no-object-score" in c for c in commands.values())
    assert all(result["seconds"]["steps"][name] > 0 for name in commands)
    # the tuned models really are what their row says
    from masqclip_cli.modeling.factory import load_model

    assert load_model(work / "masq-tune-qkv" / "final.safetensors").masq.tune == "qkv"
    assert load_model(work / "masq-longer" / "final.safetensors").masq.tune == "q"
    # --no-docs leaves the committed tables alone
    after = (REPO / "docs" / "ablations.md").read_bytes() if (REPO / "docs" / "ablations.md").exists() else None
    assert after == docs_before
