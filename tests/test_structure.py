"""The house rules that code can check: the stage order, no import cycles, lazy public surfaces,
which packages may import click, rich and safetensors, and module size.

Every rule reads the package's own source with ``ast`` (all imports, also those inside
functions), except the start-up rule, which imports the CLI in a second process.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "teleport_cli"

# The pipeline, lowest first: a unit may import only units of a lower rank (and itself).
# This refines the tiers `errors, records, config < checkpoints, data, models < nullspace <
# baselines, audit < pipeline < bench < cli` into one order (the process group of data
# parallelism, ``parallel``, right after the config: every later stage reduces through it): data files are read through the
# checkpoint I/O (the only importer of safetensors), and models are loaded from checkpoints.
STAGES = ["errors", "records", "config", "parallel", "checkpoints", "data", "models", "nullspace", "baselines", "audit",
          "pipeline", "bench", "cli"]
RANK = {name: i for i, name in enumerate(STAGES)}
TOP_MODULES = {"__init__", "__main__", "errors", "records", "config", "pipeline"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(importer: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The package modules a ``from ... import`` names (a submodule where a name is one)."""
    if node.level:
        base = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if not module.startswith("teleport_cli"):
        return []
    subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
    return subs if subs and len(subs) == len(node.names) else [module] + subs


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                edges |= set(_resolve(name, path, node))
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("teleport_cli")}
        graph[name] = {e for e in edges if e in MODULES and e != name}
    return graph


def _external(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _unit(module: str) -> str:
    """The stage a module belongs to: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_top_level_holds_the_stage_modules_and_one_subpackage_per_stage():
    entries = {p.stem for p in PKG.iterdir() if p.name != "__pycache__"}
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert entries - packages == TOP_MODULES
    assert packages == set(STAGES) - TOP_MODULES
    for name in packages:
        assert (PKG / name / "__init__.py").is_file(), f"{name}/ has no __init__.py"


def test_every_unit_imports_only_units_below_it():
    bad = []
    for module, edges in _graph().items():
        unit = _unit(module)
        if unit in ("__init__", "__main__"):
            continue
        for target in edges:
            other = _unit(target)
            if other == "__init__" and target == "teleport_cli":
                other = "__init__"
                allowed = True  # `from .. import __version__`: the root holds no code to import back
            else:
                allowed = other == unit or RANK[other] < RANK[unit]
            if not allowed:
                bad.append(f"{module} ({unit}) imports {target} ({other})")
    assert not bad, "imports against the stage order:\n" + "\n".join(sorted(bad))


def test_package_has_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_cycle_finder_finds_a_planted_cycle(monkeypatch, tmp_path):
    """The walk above is real: two modules that import each other are reported."""
    pkg = tmp_path / "teleport_cli"
    (pkg / "nullspace").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nullspace" / "__init__.py").write_text("")
    (pkg / "nullspace" / "a.py").write_text("from .b import x\n")
    (pkg / "nullspace" / "b.py").write_text("def f():\n    from .a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {_module_name(p): p for p in pkg.rglob("*.py")})
    with pytest.raises(AssertionError, match="teleport_cli.nullspace.a -> teleport_cli.nullspace.b -> teleport_cli.nullspace.a"):
        test_package_has_no_import_cycle()


def test_only_cli_imports_click_and_rich_and_only_cli_exits():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] in ("cli", "__main__.py"):
            continue
        assert not _external(path) & {"click", "rich"}, f"{rel} imports click/rich"
        assert "sys.exit(" not in path.read_text(), f"{rel} exits the process: raise a TeleportError instead"


def test_only_checkpoint_io_imports_safetensors():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if "safetensors" in _external(path):
            assert rel.parts[0] == "checkpoints", f"{rel} imports safetensors"


def test_modules_stay_small():
    for path in PKG.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 450, f"{path.relative_to(PKG)} is over 450 lines: split it"


def test_public_surfaces_name_real_objects():
    """Each subpackage's lazy ``__init__`` maps its names to modules that define them."""
    import importlib

    for name in ["teleport_cli", *(f"teleport_cli.{s}" for s in STAGES if s not in TOP_MODULES | {"cli"})]:
        package = importlib.import_module(name)
        for export, module in package._EXPORTS.items():
            # a submodule of that name would replace the export once it is imported
            assert f"{name}.{export}" not in MODULES, f"{name}.{export} is both an export and a module"
            obj = getattr(package, export)
            owner = importlib.import_module(module, name)
            assert obj is getattr(owner, export), f"{name}.{export}"


@pytest.mark.parametrize("code", [
    "import teleport_cli, teleport_cli.cli",
    "import sys; sys.argv = ['teleport', '--version']\nfrom teleport_cli.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
    "import sys; sys.argv = ['teleport', 'apply', '--no-such-flag']\nfrom teleport_cli.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
])
def test_start_up_imports_no_torch_timm_or_safetensors(code):
    """``import teleport_cli``, ``teleport --version`` and a usage error answer without torch."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in ('torch', 'timm', 'torchvision', 'safetensors') if m in sys.modules)))"
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PKG.parent, timeout=120)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [], p.stderr
