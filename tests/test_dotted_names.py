"""Every dotted ``carfast.`` name the code, docs and results pages mention resolves to something.

A renamed module or function leaves its old name behind in docstrings and RESULTS pages, where no
import catches it; this test reads them all and imports each name.
"""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A name starts at a word boundary that is not part of a path, a dotted name or a quoted string (format
# tags such as "carfast.pruned_model" are data, not names).
NAME = re.compile(r"(?<![\w/.\-\"'])carfast(?:\.[A-Za-z_]\w*)+")
# Compiled extensions: present only where they were built (carfast.extensions says why one is absent).
OPTIONAL = {"carfast._C", "carfast._C_cuda"}


def _sources():
    """The files a user or developer reads: package code, docs, READMEs, benchmark and experiment pages."""
    for folder in ("carfast", "docs", "benchmarks", "experiments"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md"))
    yield from ROOT.glob("*.md")


def resolves(name: str) -> bool:
    """True when ``name`` is a module, or an attribute path below the longest importable module prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def test_resolves_knows_a_dangling_name():
    assert resolves("carfast.scoring.race.Race")
    assert resolves("carfast.evaluate")
    assert not resolves("carfast.masking")
    assert not resolves("carfast.evaluate.evaluate")


def test_every_dotted_carfast_name_resolves():
    sources = list(_sources())
    if not (ROOT / "docs").is_dir():
        pytest.skip("run from a source checkout: docs/ is not here")
    dangling = {}
    for path in sources:
        for match in NAME.finditer(path.read_text(errors="replace")):
            name = match.group(0)
            if name not in OPTIONAL and not resolves(name):
                dangling.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not dangling, "dotted names that resolve to nothing (rename them to the current name):\n" + "\n".join(
        f"  {name}: {', '.join(sorted(set(paths))[:4])}" for name, paths in sorted(dangling.items()))
