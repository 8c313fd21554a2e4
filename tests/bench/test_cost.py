"""bench/cost.py's arithmetic and rendering on made-up timing tables (no timing here)."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cost():
    spec = importlib.util.spec_from_file_location("bench_cost", ROOT / "bench" / "cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def piece(median, lo=None, hi=None):
    return {"median": median, "min": median if lo is None else lo, "max": median if hi is None else hi, "runs": 3}


PIECES = {"forward": piece(0.5), "gradient": piece(2.0, 1.8, 2.4), "hvp_fd": piece(2.1), "hvp_exact": piece(7.0)}


def test_floor_follows_the_issue_definition(cost):
    """1 forward + accepted x passes x gradient: 2 passes for grad-norm, 2k + 1 for the look-ahead."""
    assert [cost.passes_per_step("grad-norm"), cost.passes_per_step("lookahead"), cost.passes_per_step("lookahead", 3)] == [2, 3, 7]
    assert cost.floor_seconds(PIECES, 5, "lookahead") == 0.5 + 5 * 3 * 2.0
    assert cost.floor_seconds(PIECES, 4, "grad-norm") == 0.5 + 4 * 2 * 2.0
    assert cost.floor_seconds(PIECES, 0, "lookahead") == 0.5
    row = {"pieces": PIECES, "lookahead_steps": 1,
           "runs": [{"cpu": 61.0, "accepted": 5, "objective": "lookahead"}, {"cpu": 17.0, "accepted": 4, "objective": "grad-norm"},
                    {"cpu": 3.0, "exit": 3}]}
    assert cost.ratios(row) == [61.0 / 30.5, 17.0 / 16.5, None]


def test_phase_split_takes_each_stage_from_its_first_event_to_the_next_stage(cost):
    events = [("load", 0.0, 10.0), ("capture", 1.0, 12.0), ("capture", 1.5, 12.5), ("bases", 2.0, 14.0),
              ("ascent", 5.0, 20.0), ("ascent", 9.0, 30.0), ("verify", 11.0, 33.0)]
    out = cost.phase_split(events, (12.5, 35.0))
    assert out == {"load": {"cpu": 1.0, "wall": 2.0}, "capture": {"cpu": 1.0, "wall": 2.0}, "bases": {"cpu": 3.0, "wall": 6.0},
                   "ascent": {"cpu": 6.0, "wall": 13.0}, "verify": {"cpu": 1.5, "wall": 2.0}}
    assert sum(p["cpu"] for p in out.values()) == 12.5 - 0.0


def test_slope_recovers_a_power_law(cost):
    xs = [64, 128, 256, 512]
    assert cost.slope(xs, [3.0 * x**2.5 for x in xs]) == pytest.approx(2.5, abs=1e-12)
    assert math.isnan(cost.slope([8, 8], [1.0, 2.0]))


def test_parse_flags_gives_config_values(cost):
    assert cost.parse_flags("--max-memory 4GB --max-seconds 540") == {"max_memory": 4 * 2**30, "max_seconds": 540.0}
    assert cost.parse_flags("--batch-size 32 --hvp exact") == {"batch_size": 32, "hvp": "exact"}


def test_section_replaces_only_its_markers(cost, tmp_path):
    rows = {"m": {"samples": 256, "params": 2.5e6, "pieces": PIECES, "lookahead_steps": 1, "flags": "",
                  "runs": [{"exit": 0, "verified": True, "cpu": 61.0, "wall": 90.0, "peak_rss": 2.0e9, "accepted": 5, "rejected": 2,
                            "objective": "lookahead", "hvp": "forward", "stop": "steps", "batch_size": 64,
                            "phases": {"load": {"cpu": 1.0, "wall": 1.0}, "ascent": {"cpu": 50.0, "wall": 70.0}}}]}}
    section = cost.render(rows, "python bench/cost.py", "test machine")
    assert section.startswith(cost.BEGIN) and section.endswith(cost.END)
    line = next(l for l in section.splitlines() if l.startswith("| `m` | defaults"))
    assert "| 30.5 | 2 |" in line  # floor 0.5 + 5 * 3 * 2.0, ratio 61 / 30.5
    doc = tmp_path / "cost.md"
    doc.write_text("# Title\n\nkept above\n\n" + cost.BEGIN + "\nold\n" + cost.END + "\n\n## Where the time went\n\nkept below\n")
    cost.write_section(doc, section)
    text = doc.read_text()
    assert text.startswith("# Title\n\nkept above\n\n") and text.endswith("\n\n## Where the time went\n\nkept below\n")
    assert "old" not in text and text.count(cost.BEGIN) == 1
    cost.write_section(doc, section)
    assert doc.read_text() == text


def test_recorded_command_drops_the_file_options(cost):
    c = "python bench/cost.py --models a,b --results r.json --doc d.md --merge x.json y.json --quick"
    assert cost.clean_command(c) == "python bench/cost.py --models a,b --quick"


def test_floor_at_the_hvp_the_run_took(cost):
    """Where --hvp auto chose double backward, each step's k products cost the measured
    double-backward pass instead of one gradient: forward + accepted * ((passes - k) * g + k * hvp)."""
    assert cost.hvp_floor_seconds(PIECES, 5, "lookahead", "exact") == 0.5 + 5 * (2 * 2.0 + 7.0)
    assert cost.hvp_floor_seconds(PIECES, 5, "lookahead", "exact", 3) == 0.5 + 5 * (4 * 2.0 + 3 * 7.0)
    assert cost.hvp_floor_seconds(PIECES, 4, "grad-norm", "exact") == 0.5 + 4 * (2.0 + 7.0)
    assert cost.hvp_floor_seconds(PIECES, 5, "lookahead", "forward") == cost.floor_seconds(PIECES, 5, "lookahead")
    no_double = {**PIECES, "hvp_exact": {"error": "no double backward"}}
    assert cost.hvp_floor_seconds(no_double, 5, "lookahead", "exact") == cost.floor_seconds(PIECES, 5, "lookahead")


def test_before_after_table_shows_both_rows(cost):
    def row(cpu, accepted, rejected, probe):
        run = {"exit": 0, "verified": True, "cpu": cpu, "wall": cpu, "peak_rss": 1e9, "accepted": accepted, "rejected": rejected,
               "objective": "lookahead", "hvp": "exact", "stop": "backtracking", "batch_size": 256, "grad_norm_ratio": 1.25,
               "phases": {"batch-size": {"cpu": probe, "wall": probe}, "ascent": {"cpu": cpu / 2, "wall": cpu / 2}}}
        return {"samples": 256, "params": 1e5, "pieces": PIECES, "lookahead_steps": 1, "flags": "", "runs": [run]}

    section = cost.render({"m": row(30.5, 5, 2, 0.25), "n": row(10.0, 1, 0, 0.1)}, "cmd", "machine", {"m": row(61.0, 5, 9, 1.0)})
    lines = [l for l in section.splitlines() if l.startswith("| `m` |")]
    assert len(lines) == 4  # the apply table, the phases, the pieces and the before -> after row
    before_after = lines[-1]
    assert "5 / 9 → 5 / 2" in before_after and "1.2500 → 1.2500" in before_after and "61 → 30.5" in before_after
    assert "2 → 1 |" in before_after  # the ratio to the floor 30.5: 61 / 30.5 -> 30.5 / 30.5
    assert f"{61.0 / 55.5:.3g} → {30.5 / 55.5:.3g}" in before_after and "1 → 0.25" in before_after
    assert not any(l.startswith("| `n` |") and "→" in l for l in section.splitlines())
