"""The README's quick-start recipes run as written, in a fresh folder, with the installed CLI.

Each ```bash block of the "Quick start" section is run by bash in a temporary folder that holds
only a link to sample_checkpoints/; each must exit 0 and write the checkpoint it names, and that
checkpoint's own metadata must record a verified teleport with at least one accepted step that
lowered the objective. The transformers section's recipe is run the same way, and its output
folder is reloaded with transformers in float64 against the losses the tool reported.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]


def _recipes() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", quick, re.S)


def test_readme_has_three_recipes():
    assert len(_recipes()) == 3


@pytest.mark.parametrize("index", range(3))
def test_quick_start_recipe_runs_as_written(index, tmp_path):
    recipe = _recipes()[index]
    (tmp_path / "sample_checkpoints").symlink_to(ROOT / "sample_checkpoints")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", "-e", "-c", recipe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / re.findall(r"-o (\S+)", recipe)[-1]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    verification = json.loads(meta["verification"])
    stats = json.loads(meta["teleport_stats"])
    assert verification["passed"] is True
    assert stats["steps_accepted"] >= 1
    # the default objective, the look-ahead loss, is minimised on the level set
    assert stats["objective"] == "lookahead" and stats["objective_after"] < stats["objective_before"]


def test_transformers_recipe_runs_as_written(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    section = (ROOT / "README.md").read_text().split("## Hugging Face transformers folders", 1)[1].split("\n## ", 1)[0]
    (recipe,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    (tmp_path / "sample_checkpoints").symlink_to(ROOT / "sample_checkpoints")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(["bash", "-e", "-c", recipe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / re.findall(r"-o (\S+)", recipe)[-1]
    doc = json.loads((tmp_path / "my_gpt2.json").read_text())
    stats = json.loads(json.loads((out / "teleport.json").read_text())["teleport_stats"])
    assert doc["verified"] is True and stats["steps_accepted"] >= 1
    assert stats["objective"] == "lookahead" and stats["objective_after"] < stats["objective_before"]
    model = transformers.GPT2LMHeadModel.from_pretrained(out).double().eval()
    for name in ("calibration", "holdout"):
        tokens = load_file(str(ROOT / "sample_checkpoints" / f"gpt2_shakespeare_{name}.safetensors"))["tokens"]
        with torch.no_grad():
            assert float(model(input_ids=tokens, labels=tokens).loss) == pytest.approx(doc[name]["loss_after"], rel=1e-5)
