"""The package's house rules (docs/architecture.md), checked: the packages depend in one declared
direction (counting imports made inside functions), every import inside a function says why it is
there, modules have at most 400 lines, and there is no import cycle; and a ranker actor's process
imports none of the driver's side."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alro_ray"
MODULES = sorted(PACKAGE.rglob("*.py"))
UNITS = [p for p in MODULES if p != PACKAGE / "__init__.py"]  # the package's own __init__ is no unit
MAX_LINES = 400

# The floors, bottom first: a unit (a subpackage or a top-level module of alro_ray) may import
# only from its own floor or the floors below it. docs/architecture.md draws the same order.
LAYERS = ["errors", "files", "logs", "config", "cluster", "tracking", "classical", "model", "data", "compat", "rank", "train",
          "tune", "evaluate", "serve", "cli"]


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """alro_ray.train.trainer -> train; alro_ray.errors -> errors."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_imports(tree: ast.AST) -> list[tuple[ast.stmt, list[str], bool]]:
    """Every import of an alro_ray module: (node, modules named, inside a function or class).
    `from alro_ray import x` names alro_ray.x."""
    top = {id(n) for n in getattr(tree, "body", [])}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("alro_ray.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "alro_ray":
                names = [f"alro_ray.{a.name}" for a in node.names]
            elif node.module.startswith("alro_ray."):
                names = [node.module]
        if names:
            out.append((node, names, id(node) not in top))
    return out


def upward_imports(module: str, source: str) -> list[str]:
    """The imports in `source` (the text of `module`) that climb to a higher floor."""
    me = LAYERS.index(unit(module))
    return [f"{module}:{node.lineno} imports {name} ({unit(name)} is above {unit(module)})"
            for node, names, _ in package_imports(ast.parse(source)) for name in names
            if LAYERS.index(unit(name)) > me]


def unexplained_inner_imports(module: str, source: str) -> list[str]:
    """Imports of package modules inside functions with no comment on their lines or just above."""
    lines = source.splitlines()
    bad = []
    for node, _, inner in package_imports(ast.parse(source)):
        if not inner:
            continue
        own = lines[node.lineno - 1: node.end_lineno]
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        if not any("#" in line for line in own) and not above.startswith("#"):
            bad.append(f"{module}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return bad


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (a `from pkg import name`
    counts as importing pkg.name when that is a module)."""
    names = {_name(p) for p in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[_name(path)] = {d for d in deps if d in names and d != _name(path)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodules is how a package is assembled.
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_every_unit_has_a_floor():
    units = {unit(_name(p)) for p in UNITS}
    assert units <= set(LAYERS), f"units without a floor in LAYERS: {sorted(units - set(LAYERS))}"
    assert set(LAYERS) <= units, f"floors with no code: {sorted(set(LAYERS) - units)}"


def test_packages_depend_in_one_direction_counting_imports_inside_functions():
    bad = [line for p in UNITS for line in upward_imports(_name(p), p.read_text())]
    assert not bad, "imports against the declared order (tests/test_architecture.py LAYERS):\n" + "\n".join(bad)


def test_every_import_inside_a_function_says_why():
    bad = [line for p in MODULES for line in unexplained_inner_imports(_name(p), p.read_text())]
    assert not bad, ("imports inside functions without a one-line reason (a comment on the line or "
                     "just above); or move them to the module top:\n" + "\n".join(bad))


def test_the_order_check_finds_planted_backward_imports():
    inner = "def f():\n    from alro_ray.train.trainer import run_training  # lazy\n    return run_training\n"
    assert upward_imports("alro_ray.data.prepare", inner) == [
        "alro_ray.data.prepare:2 imports alro_ray.train.trainer (train is above data)"]
    assert upward_imports("alro_ray.model.loading", "from alro_ray import rank\n") == [
        "alro_ray.model.loading:1 imports alro_ray.rank (rank is above model)"]
    assert upward_imports("alro_ray.serve.app", inner) == []  # serve is above train: allowed
    assert upward_imports("alro_ray.data.hints", "from alro_ray.data import prompts\n") == []  # its own floor


def test_the_reason_check_finds_a_bare_inner_import():
    bare = "def f():\n    from alro_ray.rank.ranking import rank_batch\n    return rank_batch\n"
    assert unexplained_inner_imports("alro_ray.x", bare) == [
        "alro_ray.x:2: from alro_ray.rank.ranking import rank_batch"]
    said = bare.replace("rank_batch\n    return", "rank_batch  # imports torch\n    return")
    above = "def f():\n    # imports torch\n    from alro_ray.rank.ranking import rank_batch\n"
    top = "from alro_ray.rank.ranking import rank_batch\n"
    assert unexplained_inner_imports("alro_ray.x", said) == []
    assert unexplained_inner_imports("alro_ray.x", above) == []
    assert unexplained_inner_imports("alro_ray.x", top) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_at_most_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by concern"


def test_no_import_cycle_counting_imports_inside_functions():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# What an `alro evaluate` actor's new process must not import: the driver's side of the job. Each
# was seconds of every evaluation's fixed cost when the actor class sat in batch_eval.py
# (docs/benchmarks.md, peers: "The actor's imports trimmed").
DRIVER_ONLY = ("scipy.stats", "matplotlib", "alro_ray.evaluate.baselines", "alro_ray.evaluate.report",
               "alro_ray.classical.retrievers", "alro_ray.data.retrieval")


def test_the_ranker_actor_module_imports_none_of_the_drivers_side():
    code = ("import sys, alro_ray.evaluate.rank_actor; "
            f"print(','.join(m for m in {DRIVER_ONLY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
    code = code.replace("alro_ray.evaluate.rank_actor", "alro_ray.evaluate.batch_eval")  # the check can fail
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "alro_ray.evaluate.baselines" in out.split(",")
