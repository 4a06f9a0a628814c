"""The project's layout: the library never imports its benchmarks or tests, and every benchmark folder says what it
holds. The layers inside the library are a contract that `lint-imports` checks (pyproject.toml, `make quality`)."""

import ast
import re
from pathlib import Path

import trl_micro

PACKAGE = Path(trl_micro.__file__).resolve().parent


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _imported_names(path: Path) -> set[str]:
    """Every absolute module name `path` imports (relative imports stay inside the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_library_never_imports_benchmarks_or_tests():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in _imported_names(path) if name.split(".")[0] in {"benchmarks", "tests"}
        )
        for path in _modules()
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_data_loaders_do_not_import_the_catalog_that_imports_them():
    """catalog names the built-ins and imports their loaders (dsp, hh); the loaders find their data in data_dir."""
    for name in ("dsp.py", "hh.py"):
        tree = ast.parse((PACKAGE / "bundled" / name).read_text())
        relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert "catalog" not in relative and "data_dir" in relative, (name, relative)


BENCHMARKS = PACKAGE.parent / "benchmarks"
LOCAL_PATH = re.compile(r"(?<![\w.])/(?:work|root|home|Users)/\S+")


def test_every_benchmark_folder_says_what_it_holds_and_how_to_regenerate_it():
    folders = sorted(path for path in BENCHMARKS.iterdir() if path.is_dir() and any(path.glob("*.py")))
    assert {path.name for path in folders} >= {"harness", "studies", "rl", "performance"}
    assert [path.name for path in BENCHMARKS.glob("*.py")] == ["__init__.py"], "scripts belong in a folder by role"
    for folder in folders:
        readme = folder / "README.md"
        assert readme.is_file(), f"{folder.name}/ has no README.md"
        text = readme.read_text(encoding="utf-8")
        assert f"python -m benchmarks.{folder.name}." in text, f"{folder.name}/README.md names no command"
        for script in folder.glob("*.py"):
            assert script.name == "__init__.py" or f"`{script.name}`" in text, (
                f"{folder.name}/README.md omits {script.name}"
            )


def test_benchmarks_run_as_modules():
    """`python -m benchmarks.<folder>.<script>` from the repository root: no script edits `sys.path` to import the
    package, and no document or report names a benchmark script by path as the command to run it."""
    scripts = [path for path in BENCHMARKS.rglob("*.py") if "sys.path" in path.read_text(encoding="utf-8")]
    assert scripts == []
    by_path = re.compile(r"\bpython3? benchmarks/")
    documents = [PACKAGE.parent / "README.md", PACKAGE.parent / "Makefile", *(PACKAGE.parent / "docs").glob("*.md")]
    documents += [*BENCHMARKS.rglob("*.md"), *BENCHMARKS.rglob("*.py")]
    assert [str(path) for path in documents if by_path.search(path.read_text(encoding="utf-8"))] == []


def test_reports_name_no_local_folder():
    """A report's command is one anyone can rerun from a checkout: no absolute path of the machine that ran it."""
    reports = [
        PACKAGE.parent / "BENCHMARKS.md",
        PACKAGE.parent / "README.md",
        *BENCHMARKS.rglob("results/**/*.md"),
        *BENCHMARKS.rglob("results/**/*.json"),
    ]
    found = {
        str(path.relative_to(PACKAGE.parent)): LOCAL_PATH.findall(path.read_text(encoding="utf-8")) for path in reports
    }
    assert {path: paths for path, paths in found.items() if paths} == {}


MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_a_users_page_whose_links_resolve():
    """At most about 200 lines; train, adapt, evaluate and RL within the first 100; every relative link a file.
    (The docs' links are checked by `mkdocs build --strict`, which `make test` runs.)"""
    root = PACKAGE.parent
    lines = (root / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
    head = "\n".join(lines[:100])
    for section in ("## Train a MiCRo reward model", "## Adapt it to a user", "## Evaluate", "## Train a policy"):
        assert section in head, section
    targets = [target.split("#")[0] for target in MARKDOWN_LINK.findall("\n".join(lines))]
    missing = [target for target in targets if target and "://" not in target and not (root / target).exists()]
    assert missing == []


def test_report_commands_write_the_home_folder_as_tilde():
    """The shell expands `--cache_dir ~/...` before a script sees it; the report quotes it back as typed."""
    from benchmarks import command_line

    home = str(Path.home())
    command = command_line("benchmarks.rl.x", ["--cache_dir", f"{home}/.cache/a b", "--name", "it's", home])
    assert command == "python -m benchmarks.rl.x --cache_dir ~/'.cache/a b' --name 'it'\"'\"'s' ~"
    assert not LOCAL_PATH.findall(command.replace("~/", ""))
    assert command_line("s", [f"{home}x/y"]) == f"python -m s {home}x/y"  # a sibling folder is not the home
