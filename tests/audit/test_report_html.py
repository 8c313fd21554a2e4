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


@pytest.fixture(scope="module")
def resnet_rows():
    """Audit rows of the shipped test_resnet against a copy with every conv/linear weight moved by 1e-3
    (BatchNorm left alone): real layer names, real drifts, and BatchNorm weight changes of exactly 0."""
    import torch

    from teleport_cli.audit.compare import audit_models
    from teleport_cli.audit.settings import AuditSettings
    from teleport_cli.data.tensors import TensorData
    from teleport_cli.models.loading import load_model

    a = load_model(SAMPLES / "fmnist_test_resnet_mid.safetensors")[0].eval()
    b = load_model(SAMPLES / "fmnist_test_resnet_mid.safetensors")[0].eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in b.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(1 + 1e-3 * torch.randn(m.weight.shape, generator=g))
    data = TensorData(torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
    rows = audit_models(a, b, data, settings=AuditSettings(iterations=2, probes=1)).doc["layers"]
    bn = {n for n, m in a.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    return rows, bn


def _overlap(p, q) -> float:
    return max(0.0, min(p.x1, q.x1) - max(p.x0, q.x0)) * max(0.0, min(p.y1, q.y1) - max(p.y0, q.y0))


def test_drift_plot_legend_covers_no_bar_and_unchanged_weights_are_zero(resnet_rows):
    from teleport_cli.audit.html import drift_figure

    rows, bn = resnet_rows
    shown = [r for r in rows if r["output_drift"] is not None]
    zeros = [r["name"] for r in shown if r["rel_weight_change"] == 0.0]
    assert bn and set(zeros) >= bn & {r["name"] for r in shown} and zeros  # BatchNorm rows are drawn and unchanged
    # also a case with one bar reaching the top of the axis at the legend's old corner
    tall = [dict(r) for r in shown]
    tall[0]["output_drift"] = max(r["output_drift"] for r in shown) * 1e3
    for case in (shown, tall):
        fig = drift_figure(case)
        try:
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            ax = fig.axes[0]
            legend = ax.get_legend().get_window_extent(renderer)
            bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_height() > 0]
            assert len(bars) == sum((r["output_drift"] or 0) > 0 for r in case) + sum((r["rel_weight_change"] or 0) > 0 for r in case)
            assert all(_overlap(legend, b) == 0.0 for b in bars)
            assert _overlap(legend, ax.get_window_extent(renderer)) == 0.0  # outside the plotting area altogether
            assert _overlap(legend, ax.title.get_window_extent(renderer)) == 0.0
            # no bar of invented height: every bar is one of the positive values, the axis bottom is above 1e-12
            heights = sorted(p.get_height() for p in ax.patches)
            positive = sorted(v for r in case for v in (r["output_drift"], r["rel_weight_change"]) if (v or 0) > 0)
            assert heights == pytest.approx(positive, rel=1e-12)
            assert ax.get_ylim()[0] >= min(positive) / 10 * (1 - 1e-9)
            # each zero is a "0" in its own slot: at the weight-change offset of that layer
            marks = sorted(t.get_position()[0] for t in ax.texts if t.get_gid() == "zero")
            names = [r["name"] for r in case]
            assert marks == pytest.approx(sorted(names.index(n) + 0.2 for n in zeros))
            assert all(t.get_text() == "0" for t in ax.texts if t.get_gid() == "zero")
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
