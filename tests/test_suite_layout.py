"""The test suite's own rules: no test module imports another (shared code lives in conftest.py
and *_helpers.py), tools/ scripts are imported with tool_helpers.load_tool rather than by
putting tools/ on sys.path, and every other module here is named *_helpers.py."""

import ast
import glob
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def _extends_sys_path(tree) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr in ("insert", "append") and ast.unparse(n.func.value) == "sys.path"
               for n in ast.walk(tree))


def test_no_test_module_imports_another_and_helpers_share_one_name_style():
    for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
        name = os.path.basename(path)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = [m for m in _imported_modules(tree) if m.split(".")[0].startswith("test_")]
        assert not imported, f"{name} imports the test module(s) {imported}"
        assert not _extends_sys_path(tree), \
            f"{name} changes sys.path; import tools/ scripts with tool_helpers.load_tool"
        if not name.startswith("test_") and name != "conftest.py":
            assert name.endswith("_helpers.py"), f"{name}: name helper modules *_helpers.py"
