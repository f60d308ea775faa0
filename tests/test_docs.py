"""The repository explains itself: what code, tests and docs cite is in docs/, not elsewhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEHAVIOUR = ROOT / "docs" / "behaviour.md"


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.toml", "*.yaml", "*.sh", "*Dockerfile*"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def test_no_file_cites_a_specification_outside_the_repository() -> None:
    cited = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _tracked_text_files()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if re.search(r"\bSPEC(\.md)? §", line)
    ]
    assert cited == [], "cite docs/behaviour.md instead"


def test_every_cited_section_of_the_behaviour_page_exists() -> None:
    sections = set(re.findall(r"^## (§\d+) ", BEHAVIOUR.read_text(), re.M))
    assert sections == {f"§{n}" for n in range(1, 9)}
    cited: dict[str, str] = {}
    for path in _tracked_text_files():
        for match in re.finditer(r"behaviour\.md\)? (§\d+)((?:[-, ]+§\d+)*)", path.read_text()):
            for section in re.findall(r"§\d+", match.group(0)):
                cited.setdefault(section, str(path.relative_to(ROOT)))
    assert cited, "nothing cites docs/behaviour.md"
    missing = {section: where for section, where in cited.items() if section not in sections}
    assert missing == {}
