"""The package's import graph, read from the source (ast): no circle, and nothing outside the package.

Every `import` and `from ... import` of every module of af_next_jax and af_next_kernels counts, those
inside functions too: a lazy import that closes a circle hides it until the day someone moves it to
the top. A module depends on each module it imports and on that module's parent packages (their
`__init__` runs first), but not on its own parents (they are being imported already when it runs).
The installed package holds only af_next_jax and af_next_kernels (setup.py), so the repository's other
folders (benchmarks/, tests/, experiments/, ...) are never imported from it: they may import the
package, not the other way round.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"af_next_jax": ROOT / "af_next_jax", "af_next_kernels": ROOT / "kernels"}
# Top-level folders of the repository that are not in the installed package.
REPOSITORY_ONLY = ("benchmarks", "tests", "experiments", "notebooks", "kernels", "docs")


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = (package, *path.relative_to(folder).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """Every module name `name`'s source imports (absolute, as written or resolved from relative)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package upwards
                package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            imported.add(source)
            imported |= {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules}
    return imported


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: the package modules it depends on}, {module: everything it imports})."""
    modules = _modules()
    graph, everything = {}, {}
    for name, path in modules.items():
        everything[name] = _imports(name, path, modules)
        own_parents = set(_parents(name))
        graph[name] = {dependency for target in everything[name] for dependency in (*_parents(target), target)
                       if dependency in modules and dependency != name and dependency not in own_parents}
    return graph, everything


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return stack[stack.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_import_graph_has_no_circle():
    graph, _ = import_graph()
    assert "af_next_jax.convert.hf_import" in graph and "af_next_kernels.flash_attention" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_lazy_import_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_never_imports_the_repositorys_other_folders():
    _, everything = import_graph()
    outside = {f"{module} imports {target}" for module, targets in everything.items() for target in targets
               if target.split(".")[0] in REPOSITORY_ONLY}
    assert not outside, sorted(outside)
