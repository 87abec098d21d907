"""The house plan holds: every import inside `lm` points to a lower layer (README, "How the code
is laid out"), and launch/ runs the CLI rather than importing training code."""

import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "evaluation", "icl", "convert", "train", "bench")

# Bottom to top; a unit may import only units of lower layers. The README's table says the same.
LAYERS = [
    {"lm.utils", "lm.storage"},
    {"lm.models", "lm.data", "lm.lease"},
    {"lm.parallel", "lm.lora", "lm.decode", "lm.inspect", "lm.history"},
    {"lm.checkpoint"},
    {"lm.train", "lm.convert"},
    {"lm.config", "lm.evaluation"},
    {"lm.icl", "lm.finetune", "lm.compile"},
    {"lm.bench"},
    {"lm.run"},
    {"lm.main"},
]


def unit(module: str) -> str:
    """lm.models.attention -> lm.models (a package is one unit); lm.train -> lm.train."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in PACKAGES:
        return "lm." + parts[1]
    return ".".join(parts[:2])


def lm_imports(path: pathlib.Path) -> set[str]:
    """The lm units a file imports (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module == "lm":
                names = [f"lm.{a.name}" for a in node.names]
        else:
            continue
        found |= {unit(n) for n in names if n.startswith("lm.")}
    return found


def import_graph() -> dict[str, set[str]]:
    graph = collections.defaultdict(set)
    for path in (ROOT / "lm").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "lm":
            continue
        source = unit(module)
        graph[source] |= lm_imports(path) - {source}
    return graph


def test_every_import_points_down():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    graph = import_graph()
    assert set(graph) <= set(layer), f"units missing from LAYERS: {sorted(set(graph) - set(layer))}"
    upward = sorted(
        f"{source} (layer {layer[source]}) imports {target} (layer {layer[target]})"
        for source, targets in graph.items()
        for target in targets
        if layer[target] >= layer[source]
    )
    assert not upward, upward


def test_launch_imports_no_training_code():
    allowed = {"lm.config", "lm.storage"}  # sweep helpers, configs, bucket paths
    for path in (ROOT / "launch").glob("*.py"):
        assert lm_imports(path) <= allowed, (path.name, lm_imports(path) - allowed)


def module_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The lm modules a file imports: ``from lm.a import b`` is lm.a.b when that is a module,
    else lm.a (a package's __init__ counts as the module lm.a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
    return found


def test_no_modules_import_each_other():
    """No import cycle between modules, inside packages too (lazy imports count)."""
    paths = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "lm").rglob("*.py")
    }
    graph = {m: module_imports(p, set(paths)) - {m} for m, p in paths.items()}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, sorted(set(cycles))[:10]


def test_no_function_is_longer_than_100_lines():
    long = []
    for path in sorted((ROOT / "lm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


def test_the_public_api_is_the_modules_objects_and_import_lm_loads_no_jax():
    import importlib
    import subprocess
    import sys

    import lm

    for name in lm.__all__:
        module = importlib.import_module(lm._EXPORTS[name])
        assert getattr(lm, name) is getattr(module, name), name
    assert set(lm.__all__) <= set(dir(lm))
    probe = "import sys, lm; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
