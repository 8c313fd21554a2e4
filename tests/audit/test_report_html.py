"""The HTML page: self-contained, plots present and decoded by a real browser; ``apply --report``."""

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib.image
import pytest
from click.testing import CliRunner

from teleport_cli.audit.report import report_for_apply
from teleport_cli.cli import cli
from teleport_cli.config import TeleportConfig
from teleport_cli.pipeline import apply as run_apply

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")



def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _plots(page: str) -> dict[str, tuple[int, int]]:
    """id -> (height, width) of every embedded PNG, decoded independently of the browser."""
    out = {}
    for pid, b64 in re.findall(r'<img id="([\w-]+)" class="plot" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        raw = base64.b64decode(b64)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        out[pid] = matplotlib.image.imread(io.BytesIO(raw), format="png").shape[:2]
    return out


def _dump_dom(path) -> str:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", "--dump-dom", path.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """One report page of the mid checkpoint against the converged one (both shipped)."""
    out = tmp_path_factory.mktemp("page") / "report.html"
    r = run("report", SAMPLES / "mlp_digits_mid.safetensors", SAMPLES / "mlp_digits_converged.safetensors",
            "--data", SAMPLES / "digits_calibration.safetensors", "--holdout", SAMPLES / "digits_holdout.safetensors",
            "--lr", "0.5", "--iterations", "5", "--probes", "2", "--spectrum-layer", "hidden.1", "--html", out, "-q", "--json")
    assert r.exit_code == 4, r.output  # the converged model is no teleport of the mid one: the page is written anyway
    return out, json.loads(r.stdout)


def test_page_is_self_contained_with_three_decodable_plots(page):
    path, doc = page
    text = path.read_text(encoding="utf-8")
    assert doc["html"] == str(path)
    assert "<title>teleport report: mlp_digits_mid.safetensors vs mlp_digits_converged.safetensors</title>" in text
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing loaded from outside
    plots = _plots(text)
    assert set(plots) == {"plot-drift", "plot-null-dim", "plot-spectrum"}
    assert all(h > 100 and w > 200 for h, w in plots.values())
    assert 'id="verdict">FAIL' in text and "unstable" in text and "adaptive optimizers" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does this)")
def test_page_renders_in_headless_chromium(page):
    dom = _dump_dom(page[0])
    assert "<title>teleport report: mlp_digits_mid.safetensors vs mlp_digits_converged.safetensors</title>" in dom
    # the page's own script counts the <img class="plot"> the browser decoded (naturalWidth > 0)
    assert 'data-plots-rendered="3"' in dom


def test_apply_report_writes_the_page_of_the_teleport_just_done(samples, tmp_path):
    out, html_out = tmp_path / "out.safetensors", tmp_path / "apply.html"
    r = run("apply", samples / "mlp_digits_mid.safetensors", "--data", samples / "digits_calibration.safetensors",
            "-o", out, "--steps", "5", "--report", html_out, "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["report"] == str(html_out)
    text = html_out.read_text(encoding="utf-8")
    assert f"<title>teleport report: mlp_digits_mid.safetensors vs {out.name}</title>" in text
    assert set(_plots(text)) == {"plot-drift", "plot-null-dim", "plot-spectrum"}
    # the page gates exactly what apply verified: the same held-out split and the same losses
    for key in ("calibration", "holdout"):
        row = re.search(rf"<tr><td>{key}</td><td>(\d+)</td><td>([^<]+)</td><td>([^<]+)</td>", text)
        assert int(row.group(1)) == doc[key]["samples"]
        assert float(row.group(2)) == pytest.approx(doc[key]["loss_before"], rel=1e-5)
        assert float(row.group(3)) == pytest.approx(doc[key]["loss_after"], rel=1e-5)


def test_report_for_apply_uses_the_same_split_and_figures_as_verification(samples, tmp_path):
    config = TeleportConfig(steps=3, seed=5)
    data = samples / "digits_calibration.safetensors"
    result = run_apply(samples / "mlp_digits_mid.safetensors", data, tmp_path / "o.safetensors", config)
    audit = report_for_apply(result, data, None, config)
    v = result.to_dict()
    for key in ("calibration", "holdout"):
        c = audit.doc["datasets"][key]
        assert c["samples"] == v[key]["samples"]
        assert c["loss_a"] == pytest.approx(v[key]["loss_before"], rel=1e-6)
        assert c["loss_b"] == pytest.approx(v[key]["loss_after"], rel=1e-6)
        assert c["max_abs_logit_diff"] == pytest.approx(v[key]["max_abs_logit_diff"], rel=1e-4)
        assert c["passed"] is v[key]["passed"]
    assert audit.passed is True
    ref = {l["name"]: l for l in v["layers"]}
    for l in audit.doc["layers"]:
        assert l["null_dim"] == ref[l["name"]]["null_dim"]
        assert l["rel_weight_change"] == pytest.approx(ref[l["name"]]["rel_weight_change"], rel=1e-6)
