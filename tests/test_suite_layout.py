"""The test suite's own rules: no test module imports another (shared code lives in conftest.py
and *_helpers.py), tools/ scripts are imported with tool_helpers.load_tool rather than by
putting tools/ on sys.path, and every other module here is named *_helpers.py. And the
package's map: every module is listed in its package's __init__ docstring and in README's
Layout section, and comments name only module paths that exist."""

import ast
import glob
import os
import re
import tokenize

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


# ---------------------------------------------------------------------- the package's map
ROOT = os.path.dirname(HERE)
PACKAGE = os.path.join(ROOT, "mlembed_jax")
SUBPACKAGES = ("checkpoint", "data", "eval", "export", "model", "perf")


def _modules(package_dir: str) -> set[str]:
    """Module files (without .py) and subpackages (with a trailing /) of a package."""
    out = {n[:-3] for n in os.listdir(package_dir)
           if n.endswith(".py") and n != "__init__.py"}
    out |= {n + "/" for n in os.listdir(package_dir)
            if os.path.isfile(os.path.join(package_dir, n, "__init__.py"))}
    return out


def _listed(package_dir: str) -> set[str]:
    """The names an __init__ docstring lists: one `  name  what it is` line each."""
    with open(os.path.join(package_dir, "__init__.py"), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    _, _, listing = doc.partition("\nModules:\n")
    return {line.split()[0] for line in listing.splitlines() if line.startswith("  ")}


def _readme_layout() -> list[str]:
    """The entries of README's Layout block under mlembed_jax/, each one string."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    entries = []
    for line in section.splitlines():
        if line.startswith("      ") and line[6] != " ":
            entries.append(line.strip())
        elif line.startswith("    ") and line[4] != " ":  # configs/, tools/, ...: the end
            if entries:
                break
        elif entries and line.strip():
            entries[-1] += " " + line.strip()
    return entries


def test_every_module_is_listed_in_its_package_docstring_and_nowhere_stale():
    for package_dir in [PACKAGE] + [os.path.join(PACKAGE, p) for p in SUBPACKAGES]:
        name = os.path.relpath(package_dir, ROOT)
        have, listed = _modules(package_dir), _listed(package_dir)
        assert not have - listed, f"{name}/__init__.py does not list {sorted(have - listed)}"
        assert not listed - have, f"{name}/__init__.py lists missing {sorted(listed - have)}"
    assert set(SUBPACKAGES) == {p[:-1] for p in _modules(PACKAGE) if p.endswith("/")}


def test_readme_layout_names_every_module():
    entries = _readme_layout()
    keys = {k for e in entries for k in e.split("  ")[0].split()}
    top = {m for m in _modules(PACKAGE) if not m.endswith("/")}
    assert not {m + ".py" for m in top} - keys, "README Layout misses top-level modules"
    assert not {k for k in keys if k.endswith(".py")} - {m + ".py" for m in top}, \
        "README Layout names top-level modules that do not exist"
    for sub in SUBPACKAGES:
        entry = next((e for e in entries if e.startswith(sub + "/")), None)
        assert entry is not None, f"README Layout has no {sub}/ entry"
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", entry))
        missing = sorted(m for m in _modules(os.path.join(PACKAGE, sub)) if m not in words)
        assert not missing, f"README Layout's {sub}/ entry does not name {missing}"


_REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:mlembed_jax|tools|configs|launch|data|eval|export|model|perf|checkpoint)"
    r"/(?:[\w-]+/)*[\w-]+\.(?:py|sh|sbatch))\b")


def test_comments_and_docstrings_name_only_files_that_exist():
    """A module path in a comment or string of the package, tools/ or configs/ (from the
    repository root, or from mlembed_jax/ as `perf/aot.py`) names a file that is there."""
    stale = []
    for top in ("mlembed_jax", "tools", "configs"):
        for path in sorted(glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True)):
            if "demo_data" in path:
                continue
            with open(path, encoding="utf-8") as f:
                tokens = tokenize.generate_tokens(f.readline)
                texts = [t for t in tokens if t.type in (tokenize.COMMENT, tokenize.STRING)]
            for tok in texts:
                for named in _REPO_PATH.findall(tok.string):
                    if not any(os.path.exists(os.path.join(ROOT, base, named))
                               for base in ("", "mlembed_jax")):
                        stale.append(f"{os.path.relpath(path, ROOT)}:{tok.start[0]}: {named}")
    assert not stale, "paths that are not there: " + "; ".join(stale)
