"""docs/theory.md is the specification the code cites: every reference resolves, no link leaves the repository.

* every ``THEORY §n`` (and ``THEORY §n "name"``) in the sources — docstrings, comments, ``--help``
  texts, figure scripts, configs, READMEs — names a section (and subsection) of docs/theory.md;
* every equation number ``[n]`` cited there has its anchor ``eq-n`` in docs/theory.md, and every
  equation of the paper, (1)–(34) and (2.2), has one;
* no link in README.md or docs/ points outside the repository (relative links must exist, anchors
  must exist, ``../shared`` never appears; http(s) links are allowed);
* README.md and docs/ use "seed" for the random seed only, never for the paper.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
SOURCE_DIRS = ("theory", "pruning", "experiments", "paper_figures", "benchmarks", "scripts", "tests")
PAPER_EQUATIONS = [str(n) for n in range(1, 35)] + ["2.2"]

# ``THEORY §3``, ``THEORY §6–§7``, ``THEORY §1, §3``, ``THEORY §2, §5, §6``; optionally a quoted subsection name
SECTION_REF = re.compile(r"THEORY(?:\.md)?\s*(§\s*\d+(?:\s*(?:[–\-,/]|and)\s*§\s*\d+)*)(?:\s+\"([^\"\n]+)\")?")
SECTION_NUM = re.compile(r"§\s*(\d+)")
# ``[9]``, ``[2.2]``, ``[9]–[13]`` in prose; not ``x[0]``, ``f(x)[1]``, ``=[4]``, ``[1][2]`` or ``[1](link)``
EQ_REF = re.compile(r"(?<![\w\]\[{}'\"`.=)])\[(\d{1,2}(?:\.\d)?)\](?![\w\[(=:])")
EQ_RANGE = re.compile(r"\[(\d{1,2})\]\s*[–-]\s*\[(\d{1,2})\]")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)|<a\s+href=\"([^\"]+)\"|!\[[^\]\n]*\]\(([^)\s]+)\)")
# "seed" meaning the paper (the random seed — train.seed, --seed, "seeds 0..2" — is fine)
SEED_FOR_PAPER = re.compile(
    r"\b[Tt]he seed paper\b|\bseed's\b|\bseed (?:Tables?|Figure|Fig\.|Algorithm|Section|§|arXiv|text)\b"
    r"|\bof the seed\b(?!s)|\b[Tt]he seed (?:reports|says|itself|states|gives|uses|calls)\b|\bseeds?/"
    r"|\bseed value lost\b|\bseed (?:papers|documents)\b"
)


@cache
def theory_text() -> str:
    return THEORY.read_text(encoding="utf-8")


@cache
def sections() -> dict[int, str]:
    """``{n: text of section §n}`` from the ``## §n`` headings of docs/theory.md."""
    parts = re.split(r"^## §(\d+)\b.*$", theory_text(), flags=re.M)
    return {int(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@cache
def anchors(path: Path) -> frozenset[str]:
    """Explicit ``<a id>`` anchors and GitHub heading anchors of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    ids = set(re.findall(r"<a\s+id=\"([^\"]+)\"", text))
    for heading in re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        ids.add(slug)
    return frozenset(ids)


#: The prose of Python source: string literals (docstrings, ``--help`` texts, captions) and comments. A regex
#: lexer rather than :mod:`tokenize`, which is ~20× slower; it finds the same citations in this code base.
PY_PROSE = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*')


def _text_pieces(path: Path) -> list[tuple[int, str]]:
    """(first line, text) of the prose of a file: strings and comments of Python, other files whole."""
    src = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return [(1, src)]
    return [(src.count("\n", 0, m.start()) + 1, m.group(0)) for m in PY_PROSE.finditer(src)
            if "THEORY" in m.group(0) or "[" in m.group(0)]


@cache
def cited() -> tuple[list[tuple[str, int, tuple[int, ...], str | None]], list[tuple[str, int, str]]]:
    """Section references ``(file, line, numbers, name)`` and equation references ``(file, line, number)``."""
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".md", ".toml")]
    files += [ROOT / "README.md"]
    secs, eqs = [], []
    for path in files:
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        rel = str(path.relative_to(ROOT))
        for line0, text in _text_pieces(path):
            for m in SECTION_REF.finditer(text):
                nums = [int(n) for n in SECTION_NUM.findall(m.group(1))]
                if re.search(r"§\s*\d+\s*[–-]\s*§", m.group(1)) and len(nums) == 2:
                    nums = list(range(nums[0], nums[1] + 1))
                secs.append((rel, line0 + text[: m.start()].count("\n"), tuple(nums), m.group(2)))
            if "[" in text:
                for m in EQ_REF.finditer(text):
                    eqs.append((rel, line0 + text[: m.start()].count("\n"), m.group(1)))
                for m in EQ_RANGE.finditer(text):
                    for n in range(int(m.group(1)), int(m.group(2)) + 1):
                        eqs.append((rel, line0 + text[: m.start()].count("\n"), str(n)))
    return secs, eqs


def unresolved_sections(refs) -> list[str]:
    out = []
    for rel, line, nums, name in refs:
        for n in nums:
            if n not in sections():
                out.append(f"{rel}:{line}: THEORY §{n} has no section '## §{n}' in docs/theory.md")
            elif name and name.lower() not in sections()[n].lower():
                out.append(f"{rel}:{line}: THEORY §{n} \"{name}\" is not a subsection of §{n} in docs/theory.md")
    return out


def unresolved_equations(refs) -> list[str]:
    ids = anchors(THEORY)
    return [f"{rel}:{line}: [{n}] has no anchor eq-{n} in docs/theory.md" for rel, line, n in refs
            if f"eq-{n}" not in ids]


def test_the_sources_cite_sections_and_equations() -> None:
    secs, eqs = cited()
    assert len(secs) >= 40 and len(eqs) >= 200  # the scan sees the citations (they are everywhere)
    assert {n for _, _, nums, _ in secs for n in nums} >= {1, 2, 3, 4, 5, 6, 7}
    assert any(name == "two uses of one model" for *_, name in secs)


def test_every_section_reference_resolves() -> None:
    assert unresolved_sections(cited()[0]) == []


def test_every_equation_reference_resolves() -> None:
    assert unresolved_equations(cited()[1]) == []


def test_every_equation_of_the_paper_has_an_anchor() -> None:
    missing = [n for n in PAPER_EQUATIONS if f"eq-{n}" not in anchors(THEORY)]
    assert missing == []
    assert sorted(sections()) == list(range(1, len(sections()) + 1)) and len(sections()) >= 7


def test_the_resolvers_catch_dangling_references() -> None:
    """Negative controls: a section or equation that docs/theory.md does not have is reported."""
    assert unresolved_sections([("x.py", 1, (99,), None)]) == [
        "x.py:1: THEORY §99 has no section '## §99' in docs/theory.md"]
    assert unresolved_sections([("x.py", 1, (3,), "no such subsection")])
    assert unresolved_equations([("x.py", 1, "35")]) == ["x.py:1: [35] has no anchor eq-35 in docs/theory.md"]
    m = SECTION_REF.search('see THEORY.md §6–§7 and THEORY §3 "two uses of one model"')
    assert m is not None and SECTION_NUM.findall(m.group(1)) == ["6", "7"]
    assert [m.group(1) for m in EQ_REF.finditer("eqs. [9]–[13], x[0], f(a)[1], restarts=[4], [2.2]")] == [
        "9", "13", "2.2"]


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the links of the Markdown file ``path`` of the repository at ``root``."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root)
    out = [f"{rel}: mentions ../shared" for _ in re.finditer(r"\.\./shared|(?<![\w.])shared/THEORY", text)]
    for m in LINK.finditer(text):
        target = next(g for g in m.groups() if g)
        if re.match(r"https?://", target):
            continue
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            out.append(f"{rel}: link {target!r} is neither relative nor http(s)")
            continue
        file_part, _, frag = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(root):
            out.append(f"{rel}: link {target!r} points outside the repository")
        elif not dest.exists():
            out.append(f"{rel}: link {target!r}: {dest.relative_to(root)} does not exist")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            out.append(f"{rel}: link {target!r}: no anchor #{frag} in {dest.relative_to(root)}")
    return out


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(path: Path) -> None:
    assert link_problems(path) == []


def test_readme_links_the_specification_and_the_papers() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/theory.md" in text
    for arxiv in ("2411.09127", "2406.04549", "2205.04650"):
        assert f"https://arxiv.org/abs/{arxiv}" in text


def test_link_checker_catches_bad_links(tmp_path: Path) -> None:
    """Negative control: a scratch repository whose README has one good and four bad links."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "ok.md").write_text('<a id="s1"></a>\n\n## A heading\n')
    readme = root / "README.md"
    readme.write_text("[a](../shared/THEORY.md) [b](no/such.md) [c](https://example.org) [d](#nowhere) "
                      "[e](docs/ok.md#s1) [f](docs/ok.md#a-heading) [g](docs/ok.md#s2)\n")
    problems = link_problems(readme, root)
    assert problems == [
        "README.md: mentions ../shared",
        "README.md: link '../shared/THEORY.md' points outside the repository",
        "README.md: link 'no/such.md': no/such.md does not exist",
        "README.md: link '#nowhere': no anchor #nowhere in README.md",
        "README.md: link 'docs/ok.md#s2': no anchor #s2 in docs/ok.md",
    ]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_seed_means_the_random_seed_only(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    bad = [f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0)!r}"
           for m in SEED_FOR_PAPER.finditer(text)]
    assert bad == []


def test_seed_detector() -> None:
    for paper in ("the seed paper", "the seed's Table 1", "seed Figure 4", "Algorithm 1 of the seed:",
                  "The seed says", "(seed arXiv 2411.09127", "seed value lost"):
        assert SEED_FOR_PAPER.search(paper), paper
    for rng in ("train.seed = 0", "--seed 1", "3 seeds (0..2)", "the seed of the gate samples", "seed 0, 30 epochs",
                "a function of the seeds"):
        assert not SEED_FOR_PAPER.search(rng), rng
