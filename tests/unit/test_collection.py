"""Every test folder is collected by a plain `pytest` run (`make test`): none matches `norecursedirs`.

pytest's default `norecursedirs` contains "dist", which once silently dropped tests/dist from CI.
"""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_test_folder_is_skipped_by_norecursedirs():
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    patterns = opts.get("norecursedirs")
    assert patterns is not None, "set norecursedirs: pytest's default list skips tests/dist"
    folders = [p for p in (ROOT / "tests").rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert any(p.name == "dist" for p in folders)
    skipped = [p for p in folders if any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    assert not skipped, skipped
