"""docs/method.md is the note the code cites: every "method.md §N" or "§N.M" in the package, the kernels, the
benchmarks, the tests, the README and the note itself names a section the note has, and names it as docs/method.md."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
CITING = ["dsm_fast", "kernels", "benchmarks", "tests", "README.md", "docs"]
CITATION = re.compile(r"((?:docs/)?method\.md)((?:(?:\s*(?:,|and|–|-)\s*|\s+)§\d+(?:\.\d+)?)+)")
HEADING = re.compile(r"^(?:## (\d+)\.|### (\d+\.\d+)) ", re.MULTILINE)
INTERNAL = re.compile(r"(?<![\w/.])§(\d+(?:\.\d+)?)")


def sections(text: str) -> set[str]:
    """The numbers of the note's headings: '## 4. …' gives '4', '### 4.4 …' gives '4.4'."""
    return {section or subsection for section, subsection in HEADING.findall(text)}


def citations(text: str) -> list[tuple[str, str]]:
    """(the file name as cited, the section number) of every 'method.md §N[.M][, §K…]' in text."""
    return [(m.group(1), number) for m in CITATION.finditer(text) for number in re.findall(r"§(\d+(?:\.\d+)?)",
                                                                                            m.group(2))]


def cited_files():
    for name in CITING:
        path = ROOT / name
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.suffix in (".py", ".md", ".sh") and file.is_file() and file != Path(__file__).resolve():
                yield file


def test_the_note_has_numbered_sections():
    found = sections(METHOD.read_text(encoding="utf-8"))
    assert {"1", "2", "3", "4", "5", "6"} <= found, sorted(found)
    assert {"1.4", "4.4", "5.2", "6.2"} <= found, sorted(found)


def test_the_parsers_find_a_missing_section():
    """The check below can fail: a citation of a section the note lacks, or of the note without docs/, is caught."""
    text = "see docs/method.md §4.4, §9.9 and method.md §2"
    assert citations(text) == [("docs/method.md", "4.4"), ("docs/method.md", "9.9"), ("method.md", "2")]
    assert "9.9" not in sections(METHOD.read_text(encoding="utf-8"))


def test_every_citation_names_a_section_of_the_note():
    known = sections(METHOD.read_text(encoding="utf-8"))
    wrong = []
    for file in cited_files():
        text = file.read_text(encoding="utf-8")
        where = file.relative_to(ROOT)
        wrong += [f"{where}: {name} §{number}" for name, number in citations(text)
                  if number not in known or name != "docs/method.md"]
        if file == METHOD:
            wrong += [f"{where}: §{number}" for number in INTERNAL.findall(text) if number not in known]
    assert not wrong, "citations of docs/method.md that name no section of it:\n" + "\n".join(wrong)


def test_every_file_the_note_names_exists():
    """The note names code by path (dsm_fast/ implied for model/…, tools/…): a move that forgets the note fails here."""
    text = METHOD.read_text(encoding="utf-8")
    missing = [name for name in sorted(set(re.findall(r"(?<![\w/.])((?:[\w]+/)*\w+\.(?:py|sh))\b", text)))
               if not any((base / name).is_file() for base in (ROOT, ROOT / "dsm_fast"))]
    assert not missing, f"docs/method.md names files that do not exist: {missing}"
