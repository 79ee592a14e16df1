"""The import rule of ARCHITECTURE.md, checked on the source: the core imports no stage, runtimes
imports no exporter or compressor, demo-specific code reaches stages only through the suite seam,
and nothing imports the CLI. Every import counts, module-level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package name (pyproject's package-dir mapping)
PACKAGES = {"pocketfusion": "pocketfusion", "calibration": "pocketfusion.calibration", "compress": "pocketfusion.compress",
            "export": "pocketfusion.export", "runtimes": "pocketfusion.runtimes"}
STAGES = ("calibration", "compress", "export", "runtimes")
ORCHESTRATION = ("pocketfusion.cli", "pocketfusion.run", "pocketfusion.__main__", "pocketfusion.benchmarks")
# package -> stage packages it may import
ALLOWED = {"core": (), "calibration": (), "compress": ("calibration",), "runtimes": (),
           "export": ("calibration", "compress", "runtimes")}
DEMO_GATES = ("pocketfusion.suite", "pocketfusion.demo", "pocketfusion.testing")


def _modules():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "model" in path.relative_to(ROOT / folder).parts:
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "pocketfusion" or n.startswith("pocketfusion.")}


def _layer(module: str) -> str | None:
    if module.startswith(ORCHESTRATION):
        return None
    for stage in STAGES:
        if module == f"pocketfusion.{stage}" or module.startswith(f"pocketfusion.{stage}."):
            return stage
    return "core"


def _stage_of(name: str) -> str | None:
    for stage in STAGES:
        if name == f"pocketfusion.{stage}" or name.startswith(f"pocketfusion.{stage}."):
            return stage
    return None


MODULES = list(_modules())


def test_modules_found():
    names = {m for m, _ in MODULES}
    assert {"pocketfusion.artifact", "pocketfusion.export.api", "pocketfusion.runtimes.bench", "pocketfusion.calibration"} <= names


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_import_rule(module, path):
    layer = _layer(module)
    imports = _imports(path)
    assert not any(n == "pocketfusion.cli" or n.startswith("pocketfusion.cli.") for n in imports if module != "pocketfusion.__main__"), \
        f"{module} imports the CLI"
    if layer is None:
        return
    bad = sorted(n for n in imports if (s := _stage_of(n)) is not None and s != layer and s not in ALLOWED[layer])
    assert not bad, f"{module} ({layer}) imports {bad}; allowed stage packages: {ALLOWED[layer] or 'none'} (ARCHITECTURE.md)"
    if not module.startswith(DEMO_GATES):
        demo = sorted(n for n in imports if n.startswith("pocketfusion.demo"))
        assert not demo, f"{module} imports {demo}: demo prompts and metrics reach stages through pocketfusion.suite"
    orchestration = sorted(n for n in imports if n.startswith(("pocketfusion.run", "pocketfusion.benchmarks")) and
                           not n.startswith("pocketfusion.runtimes"))
    assert not orchestration, f"{module} imports orchestration code {orchestration}"


def test_rule_catches_a_violation(tmp_path):
    """The checker itself: a core module importing an exporter is reported."""
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    from pocketfusion.export.api import export\n")
    assert _stage_of(next(iter(_imports(f) - {"pocketfusion.export.api.export"}))) == "export"
    assert "export" not in ALLOWED[_layer("pocketfusion.checkpoint")]
