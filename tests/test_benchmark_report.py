"""benchmarks/report.py's rendering: issue 20's targets come from the results, and the
hand-written sections of BENCHMARKS.md survive every regeneration unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import report

HAND = "## A study by hand\n\nIts table and prose, kept as written.\n"


def _workers(ratio: float) -> dict[str, object]:
    run = {"requests_per_s": 1000.0, "server_cpu_ms_per_request": 1.0, "round": 0}
    two = {**run, "requests_per_s": 1000.0 * ratio, "server_cpu_ms_per_request": 1.2}
    return {"rounds": 1, "requests": 100, "runs": {"1": [run], "2": [two]},
            "median_requests_per_s": {"1": 1000.0, "2": 1000.0 * ratio},
            "ratio_to_first": {"1": 1.0, "2": ratio}}  # fmt: skip


@pytest.mark.parametrize(("ratio", "verdict"), [(1.05, "**missed**"), (1.5, "**met**")])
def test_hand_sections_survive_and_targets_follow_the_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ratio: float, verdict: str
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "api-workers.json").write_text(json.dumps(_workers(ratio)))
    monkeypatch.setattr(report, "RESULTS", results)
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(f"# old generated part\n\n{report.HAND_WRITTEN}\n\n{HAND}")

    first = report.render(page)
    page.write_text(first)
    second = report.render(page)

    assert first == second  # regenerating twice changes nothing
    assert first.count(report.HAND_WRITTEN) == 1
    assert first.endswith(report.HAND_WRITTEN + "\n\n" + HAND)
    assert "old generated part" not in first
    row = next(line for line in first.splitlines() if line.startswith("| `--api_workers 2`"))
    assert f"{ratio:.2f}x" in row and row.endswith(f"{verdict} |")


def test_a_page_without_the_marker_keeps_nothing(tmp_path: Path) -> None:
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# an old report with no marker\n")
    assert report.hand_written_sections(page) == ""
    assert report.hand_written_sections(tmp_path / "missing.md") == ""
