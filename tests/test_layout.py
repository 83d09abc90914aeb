"""The package layout (docs/architecture.md, "The map of the code"): layers import only downwards, no import circle,
no module over MAX_LINES, the product never imports the development tools, no test module imports another. Read
with `ast`."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_LINES = 400

# Each part's rank: a module may import its own part and parts of a lower rank, never a part of its rank or higher
# (serving and training are peers: what both need, like loading the model, is in `model`; model and adapters are
# peers too: neither imports the other).
RANK = {"base": 0, "inputs": 1, "weights": 2, "model": 3, "adapters": 3, "serving": 4, "training": 4, "evaluation": 5,
        "cli": 6}
BASE = {"idefics_cog", "idefics_cog.errors", "idefics_cog.config", "idefics_cog.quiet"}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path) -> dict[str, Path]:
    return {module_name(path, src): path for path in sorted(src.rglob("*.py"))}


def imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports count too), as absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def layer(name: str) -> str | None:
    if name in BASE:
        return "base"
    parts = name.split(".")
    if parts[0] != "idefics_cog":
        return None
    return parts[1] if parts[1] in RANK else None


def graph(src: Path) -> dict[str, set[str]]:
    """Our modules and the modules of ours that each imports."""
    found = modules(src)
    return {name: {imported for imported in imports(path, name) if imported in found and imported != name}
            for name, path in found.items()}


def layering_violations(src: Path) -> list[str]:
    problems = []
    for name, imported in graph(src).items():
        if not name.startswith("idefics_cog"):
            continue
        if layer(name) is None:
            problems.append(f"{name}: in no layer of {list(RANK)}")
            continue
        for other in sorted(imported):
            if other.startswith("idefics_dev"):
                problems.append(f"{name} imports the development package ({other})")
            elif layer(other) not in (None, layer(name)) and RANK[layer(other)] >= RANK[layer(name)]:
                problems.append(f"{name} ({layer(name)}) imports {other} ({layer(other)}), not a lower layer")
    return problems


def circles(src: Path) -> list[list[str]]:
    """Import circles between modules (packages' __init__ left out: importing a submodule runs them anyway)."""
    edges = graph(src)
    found, state = [], {}

    def visit(name, path):
        state[name] = "open"
        for other in sorted(edges.get(name, ())):
            if other in edges and (src / other.replace(".", "/")).is_dir():
                continue  # a package's __init__
            if state.get(other) == "open":
                found.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in edges:
        if name not in state:
            visit(name, [name])
    return found


def long_modules(paths, root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)}: {n} lines" for path in paths
            if (n := len(path.read_text().splitlines())) > MAX_LINES]


def test_layers_import_only_downwards_and_the_product_never_imports_the_dev_tools():
    assert layering_violations(SRC) == []


def test_there_is_no_import_circle():
    assert circles(SRC) == []


def test_no_module_is_over_the_line_limit():
    paths = list(SRC.rglob("*.py")) + [ROOT / "predict.py", ROOT / "train.py"]
    assert long_modules(paths) == []


@pytest.mark.parametrize("entry", ["predict.py", "train.py"])
def test_the_cog_entry_points_do_not_import_the_dev_tools(entry):
    assert not any(name.startswith("idefics_dev") for name in imports(ROOT / entry, entry[:-3]))


@pytest.mark.slow
def test_no_test_module_imports_another_test_module():
    """Shared test code lives in tests/support or a conftest.py; the benchmarks use it from there too."""
    offenders = []
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        name = module_name(path, ROOT)
        for imported in imports(path, name):
            leaf = imported.rsplit(".", 1)[-1]
            if imported.startswith("tests.") and leaf.startswith("test_"):
                offenders.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert offenders == []


def test_no_test_imports_the_benchmarks():
    """Tests run bench/ scripts as their users do (a subprocess), so a benchmark stays free to change its insides."""
    offenders = [f"{path.relative_to(ROOT)} imports {imported}" for path in (ROOT / "tests").rglob("*.py")
                 for imported in imports(path, module_name(path, ROOT)) if imported.split(".")[0] == "bench"]
    assert offenders == []


# --- the checks themselves can fail -----------------------------------------------------------------------------


def write(tree: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    return tree


def test_the_checks_find_an_upward_import_a_dev_import_and_a_circle(tmp_path):
    src = write(tmp_path, {
        "idefics_cog/__init__.py": "",
        "idefics_cog/inputs/__init__.py": "",
        "idefics_cog/inputs/prompt.py": "def f():\n    from idefics_cog.serving import engine\n",
        "idefics_cog/serving/__init__.py": "",
        "idefics_cog/serving/engine.py": "from idefics_dev import tiny\nfrom . import service\n",
        "idefics_cog/serving/service.py": "from idefics_cog.serving.engine import Engine\n",
        "idefics_cog/training/__init__.py": "",
        "idefics_cog/training/run.py": "from idefics_cog.serving.engine import Engine\n",
        "idefics_dev/__init__.py": "",
        "idefics_dev/tiny.py": "",
    })
    problems = layering_violations(src)
    assert any("idefics_cog.inputs.prompt (inputs) imports idefics_cog.serving.engine" in p for p in problems)
    assert any("idefics_cog.serving.engine imports the development package" in p for p in problems)
    assert any("idefics_cog.training.run (training) imports idefics_cog.serving.engine" in p for p in problems)
    assert ["idefics_cog.serving.engine", "idefics_cog.serving.service", "idefics_cog.serving.engine"] in circles(src)


def test_the_line_limit_check_finds_a_long_module(tmp_path):
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_modules(sorted(tmp_path.glob("*.py")), tmp_path) == [f"long.py: {MAX_LINES + 1} lines"]
