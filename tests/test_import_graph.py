"""The package's import graph has no cycles, and no import runs up the layer table that
docs/architecture.md draws (the test reads the table from the page, so the two cannot drift).

Why a test: a cycle makes import order matter (a half-initialised module, an ImportError that
depends on which verb ran first) and couples modules that should sit on different layers. Every
``import`` counts, deferred ones inside functions too: a deferred import hides a cycle from the
interpreter, not from the design. Only an edge from a module to a package above it is left out,
because Python imports a module's parent packages anyway.
"""
from __future__ import annotations

import ast
from pathlib import Path

import d3tune

ROOT = Path(d3tune.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The d3tune modules ``name`` imports, anywhere in its body (TYPE_CHECKING blocks aside)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            plain = [a for a in node.names if f"{base}.{a.name}" not in known]
            found |= subs | ({base} if plain else set())
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in known and m != name and m not in ancestors}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                scc = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    scc.append(w)
                    if w == v:
                        break
                if len(scc) > 1:
                    out.append(sorted(scc))
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    detail = ["; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_the_checker_finds_a_cycle_and_reads_deferred_and_relative_imports(tmp_path):
    """The check itself can fail: a two-module cycle through a deferred import is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from pkg import high\n")
    (pkg / "high.py").write_text("from . import low\nfrom pkg.low import f\n")
    known = {"pkg", "pkg.low", "pkg.high"}
    assert imports_of("pkg.low", pkg / "low.py", known) == {"pkg.high"}
    assert imports_of("pkg.high", pkg / "high.py", known) == {"pkg.low"}


# The command line only parses and prints: every verb goes through the Python API, so the CLI
# and ``import d3tune`` cannot drift apart. What else a cli module may import, and why.
CLI_ALLOWED = {
    "d3tune.api": "every verb",
    "d3tune.cli": "its own modules",
    "d3tune.cli.robust_commands": "its own modules (the --data-dir and --replicates flags)",
    "d3tune.cli.leaderboard_commands": "its own modules",
    "d3tune.cli.sweep_commands": "its own modules",
    "d3tune.errors": "UsageError: the one-line error and exit 2 the command line prints",
}


def test_the_command_line_imports_only_the_api():
    graph = import_graph()
    below = {m: sorted(graph[m] - set(CLI_ALLOWED)) for m in graph
             if m == "d3tune.cli" or m.startswith("d3tune.cli.")}
    assert below and not any(below.values()), f"cli modules importing below the API: {below}"


# --- the layer table ----------------------------------------------------------------------------

PAGE = ROOT.parent / "docs" / "architecture.md"
# (importer, imported) -> why the upward import is allowed. Empty: every layer holds.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {}


def layer_table(text: str) -> list[tuple[str, list[str]]]:
    """(layer, module patterns), top layer first, from the page's marked table."""
    import re

    body = text.split("<!-- layers: the test parses this table -->", 1)[1].strip()
    rows = []
    for line in body.splitlines()[2:]:  # header and rule
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return rows


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> list[int]:
    """The table rows (0 = top) whose patterns cover ``module``."""
    def covers(pattern: str) -> bool:
        if pattern.endswith("*"):
            stem = pattern[:-1]
            return module == stem or module.startswith(stem + ".")
        return module == pattern
    return [i for i, (_, patterns) in enumerate(table) if any(covers(p) for p in patterns)]


def test_every_module_has_one_place_in_the_layer_table():
    table = layer_table(PAGE.read_text())
    assert [name for name, _ in table][:2] == ["cli", "api"] and table[-1][0] == "base"
    placed = {m: layer_of(m, table) for m in modules()}
    missing = sorted(m for m, rows in placed.items() if not rows)
    twice = sorted(m for m, rows in placed.items() if len(rows) > 1)
    assert not missing, f"modules docs/architecture.md's layer table does not place: {missing}"
    assert not twice, f"modules the layer table places twice: {twice}"


def upward_imports(graph: dict[str, set[str]], table: list[tuple[str, list[str]]]
                   ) -> list[tuple[str, str]]:
    """(importer, imported) pairs where the imported module sits on a higher layer."""
    layer = {m: layer_of(m, table)[0] for m in graph}
    return sorted((m, dep) for m, deps in graph.items() for dep in deps
                  if layer[dep] < layer[m] and (m, dep) not in UPWARD_EXCEPTIONS)


def test_no_import_runs_up_the_layers():
    table = layer_table(PAGE.read_text())
    graph = import_graph()
    layer = {m: layer_of(m, table)[0] for m in graph}
    upward = upward_imports(graph, table)
    detail = [f"{m} ({table[layer[m]][0]}) -> {d} ({table[layer[d]][0]})" for m, d in upward]
    assert not upward, "imports that run up the layers:\n" + "\n".join(detail)
    stale = [pair for pair in UPWARD_EXCEPTIONS if pair[1] not in graph.get(pair[0], set())]
    assert not stale, f"exceptions for imports that no longer exist: {stale}"


def test_the_layer_check_can_fail():
    """A base module importing the API is caught; a module the table misses is reported."""
    table = layer_table(PAGE.read_text())
    base, api = layer_of("d3tune.errors", table)[0], layer_of("d3tune.api", table)[0]
    assert api < base  # row 0 is the top: an import from base to api runs upward
    assert layer_of("d3tune.nowhere", table) == []
    assert layer_of("d3tune.search.tuner", table) == layer_of("d3tune.reports.html", table)
    graph = {**import_graph(), "d3tune.metrics": {"d3tune.train", "d3tune.search.tuner"}}
    assert upward_imports(graph, table) == [("d3tune.metrics", "d3tune.search.tuner")]


# --- a readable public surface ---------------------------------------------------------------

# Ray Tune's hooks: a callback's, searcher's or scheduler's override is documented by the
# interface it implements (ray.tune.Callback, Searcher, TrialScheduler, Stopper).
TUNE_HOOKS = {"on_trial_start", "on_trial_result", "on_checkpoint", "on_trial_save",
              "on_experiment_end", "on_trial_complete", "on_trial_error", "setup", "suggest",
              "stop_all", "set_search_properties"}


def test_every_public_function_of_the_upper_layers_says_what_it_does():
    """api.py, specs/, search/ and reports/: every public function, class and method has a
    docstring (Tune's hook overrides aside)."""
    files = [ROOT / "api.py", *sorted((ROOT / "specs").glob("*.py")),
             *sorted((ROOT / "search").glob("*.py")), *sorted((ROOT / "reports").glob("*.py"))]
    missing = []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if not ast.get_docstring(node):
                    missing.append(f"{path.name}:{node.name}")
                if isinstance(node, ast.ClassDef):
                    missing += [f"{path.name}:{node.name}.{m.name}" for m in node.body
                                if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")
                                and m.name not in TUNE_HOOKS and not ast.get_docstring(m)]
    assert not missing, f"public names without a docstring: {missing}"


def test_every_module_the_architecture_page_names_exists():
    """A `file.py` the page names is a module of the package (found under d3tune/ by its
    path or, when the page gives only its name, by that name) or a test file."""
    import re

    named = set(re.findall(r"`([\w/]+\.py)`", PAGE.read_text()))
    files = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")}
    tests = {f"tests/{p.name}" for p in (ROOT.parent / "tests").glob("*.py")}
    missing = [n for n in sorted(named) if n.removeprefix("d3tune/") not in files
               and n not in tests and not any(f.endswith("/" + n) for f in files)]
    assert named and not missing, f"docs/architecture.md names modules that do not exist: {missing}"
