"""The house rules that code can check: import directions and module size."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "teleport_cli"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level >= 1:
                names.add("." + (node.module or ""))
    return names


def test_only_cli_imports_click_and_rich_and_lower_modules_never_import_cli():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        names = _imports(path)
        if rel.parts[0] not in ("cli", "__main__.py"):
            assert not names & {"click", "rich"}, f"{rel} imports click/rich"
            assert not any(n.startswith(".cli") for n in names), f"{rel} imports the cli"


def test_only_checkpoint_modules_import_safetensors():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if "safetensors" in _imports(path):
            assert rel.stem.startswith("checkpoint") or rel.parts[0] == "formats", f"{rel} imports safetensors"


def test_modules_stay_small():
    for path in PKG.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 450, f"{path.name} is over 450 lines: split it"
