"""The docs hold together: every results folder is indexed, every relative link resolves, and the
docs speak of the project only."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
INDEX = RESULTS / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ROW_FOLDER = re.compile(r"^\|\s*\[?`([^`]+)`")  # [`folder`](link), or `folder` while in progress


def index_rows() -> dict[str, list[str]]:
    """folder (relative to results/) -> the row's cells, from the index's tables."""
    rows = {}
    for line in INDEX.read_text(encoding="utf-8").splitlines():
        m = ROW_FOLDER.match(line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def result_folders() -> set[str]:
    top = {p.name for p in RESULTS.iterdir() if p.is_dir() and p.name != "archive"}
    archived = {f"archive/{p.name}" for p in (RESULTS / "archive").iterdir() if p.is_dir()}
    return top | archived


def doc_files() -> list[Path]:
    return [ROOT / "README.md", INDEX, *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_results_folder_is_in_the_index():
    missing = sorted(result_folders() - set(index_rows()))
    assert not missing, f"results folders without a row in results/README.md: {missing}"


def test_every_indexed_folder_exists_unless_in_progress():
    rows = index_rows()
    gone = sorted(f for f, cells in rows.items()
                  if not (RESULTS / f).is_dir() and "in progress" not in cells[5])
    assert not gone, f"rows in results/README.md for folders that do not exist: {gone}"


def test_the_docs_an_index_row_names_cite_its_folder():
    wrong = []
    for folder, cells in index_rows().items():
        cited_by = [c.strip() for c in cells[6].split(",") if c.strip().endswith(".md")]
        pattern = re.compile(rf"results/{re.escape(folder)}(?![\w.-])")
        for doc in cited_by:
            path = ROOT / doc
            if not path.is_file() or not pattern.search(path.read_text(encoding="utf-8")):
                wrong.append(f"{folder}: {doc}")
    assert not wrong, f"results/README.md says these docs cite a folder, and they do not: {wrong}"


def test_no_scripts_or_inputs_inside_results():
    stray = sorted(str(p.relative_to(ROOT)) for p in RESULTS.rglob("*")
                   if p.is_file() and p.suffix in (".py", ".raw", ".sh"))
    assert not stray, f"scripts and inputs belong in bench/, not results/: {stray}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and anchors within the page
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing files: {broken}"


def test_docs_speak_of_the_project_only():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "session" in line.lower()]
    assert not hits, f"'session' in the docs (say round or run): {hits}"


def test_readme_is_short_and_its_prose_lines_are_readable():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: put depth in docs/"
    long, fenced = [], False
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and not line.startswith("|") and len(line) > 120:
            long.append(i)
    assert not long, f"README.md prose lines over 120 characters: {long}"
