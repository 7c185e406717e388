"""The shape of the package, read from its source: the import graph and a few layering rules.

Every module under ``src/attnax`` is parsed with :mod:`ast`; every import in it (module level and
inside functions alike: a function-level import is still an edge the moment the function runs)
becomes an edge to the attnax module it names. Relative imports are resolved against the
importing module's package, and ``from P import x`` is an edge to ``P.x`` when that is a module or
package (a package stands for its ``__init__.py``) and to ``P`` otherwise. Importing a module
also runs its parent packages' ``__init__``, but that is not counted: otherwise every submodule
would "import" ``attnax/__init__.py`` and the graph would be one cycle. An explicit ``import
attnax`` or ``from attnax import name`` from a submodule is an edge to the top package.

The rules (DESIGN.md, STYLE.md, issue 19):

(a) the graph among attnax modules has no cycle;
(b) no kernel imports the layer, the spec, the backend table, the CLI or the bench;
(c) nothing imports the CLI;
(d) the spec imports no kernel module directly (the backend table stands between them);
(e) ``.attention_type`` is read only where backends are chosen (``_backends.py``) and specs are
    validated (``_spec.py``): backend choice lives in one table, not in ``if`` chains;
(f) no module imports another's underscore (private) name; ``from . import _submodule`` is a
    module, not a name, and is fine;
(g) no module is longer than :data:`MAX_LINES` lines.

The helpers are tested on small synthetic packages first, so a rule cannot pass by finding
nothing.
"""

import ast
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TOP = "attnax"
MAX_LINES = 520
# Rule (b): what a kernel must never import (the modules and anything under them).
KERNEL_FORBIDDEN = (
    "attnax._layer",
    "attnax._spec",
    "attnax._backends",
    "attnax._cli",
    "attnax._bench",
)
# Rule (e): the modules that may read `.attention_type`. The CLI builds specs from keyword
# arguments and JSON (no attribute reads today), so it is not on the list.
ATTENTION_TYPE_READERS = frozenset({"attnax._backends", "attnax._spec"})


@dataclasses.dataclass(frozen=True)
class Module:
    """One parsed source file."""

    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    num_lines: int


@dataclasses.dataclass(frozen=True)
class Edge:
    """One import of an attnax module: ``source`` imports ``target`` at ``line``."""

    source: str
    target: str
    line: int
    # The underscore names an ImportFrom takes from `target` (rule f); empty otherwise.
    private_names: tuple[str, ...] = ()


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """Dotted module name of ``path`` under ``root``, and whether it is a package ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def parse_sources(sources: Mapping[str, tuple[str, bool]]) -> dict[str, Module]:
    """Modules from ``{name: (source, is_package)}`` (the synthetic packages of the unit tests)."""
    return {
        name: Module(name, Path(name), is_package, ast.parse(text), len(text.splitlines()))
        for name, (text, is_package) in sources.items()
    }


def load_package(root: Path = SRC, top: str = TOP) -> dict[str, Module]:
    """Every module of package ``top`` under ``root``."""
    modules = {}
    for path in sorted((root / top).rglob("*.py")):
        name, is_package = module_name(path, root)
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
        modules[name] = Module(name, path, is_package, tree, len(text.splitlines()))
    return modules


def _resolve_relative(module: Module, level: int, target: str | None) -> str:
    # A package's own __init__ is its level-1 package; a plain module's is its parent.
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if level - 1 > len(package) - 1:
        raise ValueError(f"{module.name}: relative import beyond the top package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _known(name: str, known: frozenset[str]) -> str | None:
    """The longest prefix of ``name`` that is a known module (``a.b.attr`` -> ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in known:
            return prefix
    return None


def import_edges(module: Module, known: Iterable[str]) -> list[Edge]:
    """Every import in ``module`` (at any depth of the AST) of a module in ``known``."""
    known = frozenset(known)
    edges = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, known)
                if target is not None:
                    edges.append(Edge(module.name, target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, node.level, node.module)
            else:
                base = node.module or ""
            names = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # `from P import submodule`
                    edges.append(Edge(module.name, f"{base}.{alias.name}", node.lineno))
                else:
                    names.append(alias.name)
            target = _known(base, known)
            if names and target is not None:
                private = tuple(n for n in names if n.startswith("_") and not n.startswith("__"))
                edges.append(Edge(module.name, target, node.lineno, private))
    return [edge for edge in edges if edge.target != edge.source]


def all_edges(modules: Mapping[str, Module]) -> list[Edge]:
    return [edge for module in modules.values() for edge in import_edges(module, modules)]


def graph_of(edges: Iterable[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    return graph


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through every strongly connected component that has one.

    Tarjan's algorithm finds the components; within a component, a breadth-first search from its
    smallest member back to itself gives a shortest cycle, so the report is stable and short.
    """
    successors = {node: sorted(set(targets)) for node, targets in graph.items()}
    for targets in list(successors.values()):
        for target in targets:
            successors.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in successors[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(successors):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in successors[start]:
            continue
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parent:
            next_frontier = []
            for node in frontier:
                for target in successors[node]:
                    if target in component and target not in parent:
                        parent[target] = node
                        next_frontier.append(target)
            frontier = next_frontier
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(parent[path[-1]])
        cycles.append(path[::-1])
    return sorted(cycles)


def attribute_reads(module: Module, attribute: str) -> list[int]:
    """Lines where ``<anything>.attribute`` appears (keyword arguments are not attributes)."""
    return sorted(
        node.lineno
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Attribute) and node.attr == attribute
    )


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _where(edge: Edge) -> str:
    return f"{edge.source} (line {edge.line}) imports {edge.target}"


# --------------------------------------------------------------------------- the helpers


def _synthetic(packages: Iterable[str] = (), **sources: str) -> dict[str, Module]:
    """A synthetic package from keyword sources: ``p__sub`` is module ``p.sub``, ``p___a`` is
    ``p._a`` (a double underscore is a dot); the names in ``packages`` are package __init__s."""
    packages = set(packages)
    named = {key.replace("__", "."): text for key, text in sources.items()}
    return parse_sources({name: (text, name in packages) for name, text in named.items()})


def test_helpers_resolve_every_kind_of_import() -> None:
    modules = _synthetic(
        packages=("p", "p.sub"),
        p="from . import _a\nfrom .sub import f\n",
        p___a="from ._b import g\nimport p.sub.deep as d\nimport os\n",
        p___b="def late():\n    from . import _a\n    from p.sub import _hidden, shown\n",
        p__sub="from .deep import f\nfrom .. import _b\n",
        p__sub__deep="from .. import _a\n",
    )
    edges = all_edges(modules)
    assert {(edge.source, edge.target) for edge in edges} == {
        ("p", "p._a"),  # `from . import _a` in a package: the submodule
        ("p", "p.sub"),  # `from .sub import f`: f is a name, so the package
        ("p._a", "p._b"),
        ("p._a", "p.sub.deep"),  # `import p.sub.deep as d`; `import os` is no attnax edge
        ("p._b", "p._a"),  # function-level, relative
        ("p._b", "p.sub"),  # function-level, absolute
        ("p.sub", "p.sub.deep"),  # a package's `.` is itself
        ("p.sub", "p._b"),  # `from .. import _b` in a package __init__
        ("p.sub.deep", "p._a"),  # `..` from a plain module is its grandparent package
    }
    private = [(e.source, e.target, e.private_names) for e in edges if e.private_names]
    assert private == [("p._b", "p.sub", ("_hidden",))]  # submodules like `_a` are not names
    with pytest.raises(ValueError, match="beyond the top package"):
        all_edges(_synthetic(p___a="from ... import x\n"))


def test_helpers_find_a_cycle_and_pass_an_acyclic_graph() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    two = find_cycles({"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"z"}, "z": {"y", "a"}})
    assert two == [["a", "b", "a"], ["y", "z", "y"]]
    # Through the parser: a function-level import closes the loop.
    modules = _synthetic(
        packages=("p",),
        p="from ._a import f\n",
        p___a="from ._b import g\ndef f():\n    return g\n",
        p___b="def g():\n    from ._a import f\n    return f\n",
    )
    assert find_cycles(graph_of(all_edges(modules))) == [["p._a", "p._b", "p._a"]]
    # And an explicit import of the top package from a submodule counts.
    modules = _synthetic(packages=("p",), p="from ._a import f\n", p___a="import p\n")
    assert find_cycles(graph_of(all_edges(modules))) == [["p", "p._a", "p"]]


def test_helpers_see_attribute_reads_not_keywords_and_count_lines() -> None:
    (module,) = _synthetic(p___a="spec(attention_type=1)\nx = spec.attention_type\n").values()
    assert attribute_reads(module, "attention_type") == [2]
    assert module.num_lines == 2
    name, is_package = module_name(SRC / "attnax" / "kernels" / "__init__.py", SRC)
    assert (name, is_package) == ("attnax.kernels", True)


def test_the_real_package_is_seen() -> None:
    # Guards against a path mistake that would make every rule below pass vacuously.
    modules = load_package()
    assert {"attnax", "attnax._spec", "attnax.kernels", "attnax._layer"} <= set(modules)
    edges = all_edges(modules)
    assert ("attnax", "attnax.kernels") in {(edge.source, edge.target) for edge in edges}
    assert len(edges) > 50


# --------------------------------------------------------------------------- the rules


@pytest.fixture(scope="module")
def package() -> dict[str, Module]:
    return load_package()


@pytest.fixture(scope="module")
def edges(package: dict[str, Module]) -> list[Edge]:
    return all_edges(package)


def test_a_import_graph_is_acyclic(edges: list[Edge]) -> None:
    cycles = find_cycles(graph_of(edges))
    lines: dict[tuple[str, str], list[int]] = {}
    for edge in edges:
        lines.setdefault((edge.source, edge.target), []).append(edge.line)

    def describe(cycle: list[str]) -> str:
        hops = [
            f"{source} (line {', '.join(map(str, sorted(set(lines[source, target]))))})"
            for source, target in zip(cycle, cycle[1:], strict=False)
        ]
        return " -> ".join([*hops, cycle[-1]])

    assert not cycles, "import cycles:\n" + "\n".join(describe(cycle) for cycle in cycles)


def test_b_kernels_import_no_layer_spec_backends_cli_or_bench(
    edges: list[Edge], package: dict[str, Module]
) -> None:
    bad = [
        _where(edge)
        for edge in edges
        if _under(edge.source, "attnax.kernels")
        and any(_under(edge.target, forbidden) for forbidden in KERNEL_FORBIDDEN)
    ]
    assert not bad, "kernels must be usable alone:\n" + "\n".join(bad)


def test_c_nothing_imports_the_cli(edges: list[Edge], package: dict[str, Module]) -> None:
    bad = [_where(edge) for edge in edges if _under(edge.target, "attnax._cli")]
    assert not bad, "\n".join(bad)


def test_d_the_spec_imports_no_kernel(edges: list[Edge], package: dict[str, Module]) -> None:
    bad = [
        _where(edge)
        for edge in edges
        if _under(edge.source, "attnax._spec") and _under(edge.target, "attnax.kernels")
    ]
    assert not bad, "the spec reaches kernels through the backend table only:\n" + "\n".join(bad)


def test_e_attention_type_is_read_only_where_backends_are_chosen(
    package: dict[str, Module],
) -> None:
    bad = [
        f"{name}: line {line}"
        for name, module in sorted(package.items())
        if name not in ATTENTION_TYPE_READERS
        for line in attribute_reads(module, "attention_type")
    ]
    why = "`.attention_type` read outside the backend table and the spec:\n"
    assert not bad, why + "\n".join(bad)


def test_f_no_private_names_imported_across_modules(edges: list[Edge]) -> None:
    bad = [
        f"{edge.source} (line {edge.line}) takes {', '.join(edge.private_names)} from {edge.target}"
        for edge in edges
        if edge.private_names
    ]
    assert not bad, "rename a shared name to a public one:\n" + "\n".join(bad)


def test_g_modules_are_short(package: dict[str, Module]) -> None:
    bad = [
        f"{module.path.relative_to(SRC)}: {module.num_lines} lines"
        for module in sorted(package.values(), key=lambda m: m.name)
        if module.num_lines > MAX_LINES
    ]
    assert not bad, f"modules over {MAX_LINES} lines:\n" + "\n".join(bad)
