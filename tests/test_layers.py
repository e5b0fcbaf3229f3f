"""The library core never imports the command line: nothing under runtime/, models/,
data/, inference/ or engine/ imports segnest.commands (flags, recipes, text parsing) or
segnest.cli, at module level or inside a function; and the command line builds its flags
without importing torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segnest"
LIBRARY = ("runtime", "models", "data", "inference", "engine")
COMMAND_LINE = ("segnest.commands", "segnest.cli")


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` (in ``package``) imports, however deep in the file, relative
    imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_command_line(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in COMMAND_LINE)


def test_the_walker_sees_imports_at_any_depth(tmp_path):
    """The check below would pass on an empty walk: the walker finds a function's import
    and a relative one."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from segnest.commands.config import parse_scales\n"
                     "from .. import cli\n", encoding="utf-8")
    found = imported_modules(probe, "segnest.inference")
    assert "segnest.commands.config.parse_scales" in found and "segnest.cli" in found
    assert all(map(is_command_line, ("segnest.commands.config.parse_scales", "segnest.cli")))
    assert not is_command_line("segnest.commandsx")


@pytest.mark.parametrize("layer", LIBRARY)
def test_no_library_module_imports_the_command_line(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offenders = {}
    for path in files:
        package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
        offenders[str(path.relative_to(PACKAGE))] = sorted(
            filter(is_command_line, imported_modules(path, package)))
    assert {path: found for path, found in offenders.items() if found} == {}


def test_building_every_commands_flags_imports_no_torch():
    code = ("import sys; from segnest.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
