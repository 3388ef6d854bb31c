"""The package's import graph has no circles, lazy (function-level) imports included: a module can be
read, tested and moved without dragging in the modules that use it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opmix_ray", "search_spaces")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body."""
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        here = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                deps.add(mod)
                deps.update(f"{mod}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


RUN_DIR_NAMES = (".opmix_run", "error.log", "config.yaml", "data_manifest.json", "history.json", "history.parquet", "summary.json",
                 "mixture.png", "live.json", "added_domains", "train_state", "opmix_meta.json", "round_final",
                 "main/round_", "adapters_round_", "search_round_", "rounds/round_", "fidelity_round_",
                 "checkpoint_manager_snapshot")


def _strings(tree: ast.AST):
    """Every string constant in the code, f-string parts included, docstrings left out."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_run_dir_names_are_spelled_only_in_rundir():
    """A run dir's layout is opmix_ray/rundir.py: every other module names its files through it."""
    found = []
    for name, f in _modules().items():
        if name == "opmix_ray.rundir":
            continue
        for line, text in _strings(ast.parse(f.read_text())):
            found += [f"{f.relative_to(ROOT)}:{line}: {text!r}" for n in RUN_DIR_NAMES if n in text]
    assert not found, "\n".join(found)


def private_imports() -> list[str]:
    """`from opmix_ray.x import _name` where _name is not a module: a private name used across modules."""
    mods, out = _modules(), []
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                out += [f"{name}: {a.name} from {node.module}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__") and f"{node.module}.{a.name}" not in mods]
    return out


def test_no_module_imports_a_private_name_of_another():
    assert private_imports() == []


def test_no_two_modules_share_a_file_name():
    """A file name says which module it is (a base.py per subpackage, __init__ and __main__ aside)."""
    names = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f.name not in ("__init__.py", "__main__.py", "base.py"):
                names.setdefault(f.name, []).append(str(f.relative_to(ROOT)))
    assert {n: fs for n, fs in names.items() if len(fs) > 1} == {}
