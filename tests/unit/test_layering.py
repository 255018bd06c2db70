"""Package layering (docs/architecture.md): checked on the import statements with `ast`.

* spell/ and data/ import none of megatron, vllm, torch.distributed (pure algorithm and data code);
* only mcore/ and convert/ import megatron;
* only rollout/ imports vllm.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_spell"


def _dynamic_import_target(node: ast.Call) -> str:
    """The constant module name of `importlib.import_module("x")` / `__import__("x")`, else ""."""
    func = getattr(node.func, "attr", getattr(node.func, "id", ""))
    if func not in ("import_module", "__import__") or not node.args:
        return ""
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ""


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _dynamic_import_target(node):
            names.add(_dynamic_import_target(node))
    return names


def matches(name: str, banned: str) -> bool:
    return name == banned or name.startswith(banned + ".")


def files_under(sub: str | None = None) -> list[Path]:
    root = PACKAGE / sub if sub else PACKAGE
    return sorted(root.rglob("*.py"))


def offenders(files, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in files:
        for name in imported_modules(path):
            if any(matches(name, b) for b in banned):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return bad


@pytest.mark.parametrize("sub", ["spell", "data"])
def test_pure_packages(sub):
    files = files_under(sub)
    assert files, f"megatron_spell/{sub} has no python files"
    assert offenders(files, ("megatron", "vllm", "torch.distributed")) == []


def top_package(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_only_mcore_and_convert_import_megatron():
    files = [p for p in files_under() if top_package(p) not in ("mcore", "convert")]
    assert offenders(files, ("megatron",)) == []


def test_only_rollout_imports_vllm():
    files = [p for p in files_under() if top_package(p) != "rollout"]
    assert offenders(files, ("vllm",)) == []


def test_checker_sees_all_import_forms(tmp_path):
    """The checker must not be blind: it finds plain, from-, nested and importlib imports."""
    src = tmp_path / "m.py"
    src.write_text(
        "import os\nimport megatron.core as mc\nfrom torch import distributed\n"
        "def f():\n    from vllm import LLM\n    import importlib\n    importlib.import_module('vllm.x')\n"
    )
    names = imported_modules(src)
    for banned in ("megatron", "vllm", "torch.distributed"):
        assert any(matches(n, banned) for n in names), banned
    assert not any(matches(n, "megatron") for n in ("megatron_spell.spell", "megatronx"))
