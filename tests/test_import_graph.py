"""The package layer order: apps -> trainer -> model_rewards -> rollout -> hybrid_engine -> models ->
{parallel, kernels}; algorithms, rewards, tools, data (and testing) import nothing above {parallel,
kernels, config}, except that rewards may use tools (the code reward runs on the sandbox).
Every import statement of every module counts, at module or function level (a function-level import
that runs back up is still a loop), read from the AST without importing.

`PYTHONPATH=. python tests/test_import_graph.py [ROOT]` (from the repository root) prints the package graph
(edges with counts) of the verl_mega tree under ROOT (default: this checkout).
"""

import ast
import os
import subprocess
import sys
from collections import Counter

from tests.run_python import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# rank: a package may import packages of lower or equal rank only (equal only itself, see allowed())
CHAIN = {"apps": 7, "trainer": 6, "model_rewards": 5, "rollout": 4, "hybrid_engine": 3, "models": 2, "parallel": 1,
         "kernels": 1}
SIDE = {"algorithms", "rewards", "tools", "data", "testing"}  # beside the chain: only parallel / kernels / config
# (testing: tiny HF models and process launchers for tests and the demo)
BASE = {"parallel", "kernels", "config"}  # verl_mega.config: the YAML loader, imports nothing of ours
SIDE_USES = {"rewards": {"tools"}}  # side packages one side package may use (the code reward runs on the sandbox)


def layer_of(module: str) -> str | None:
    """verl_mega.models.decoder -> "models"; verl_mega.config -> "config"; other packages -> None."""
    parts = module.split(".")
    if parts[0] != "verl_mega" or len(parts) < 2:
        return None
    return parts[1]


def module_imports(path: str, module: str) -> list[tuple[str, int]]:
    """(imported verl_mega module, line) for every import statement in the file, at any depth."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(base, node.lineno)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            out += [(node.args[0].value, node.lineno)]  # importlib.import_module("verl_mega....")
    return [(m, line) for m, line in out if m.startswith("verl_mega")]


def package_modules(root: str):
    """(module name, file path) of every .py file of the verl_mega package under root."""
    pkg = os.path.join(root, "verl_mega")
    for dirpath, _, files in os.walk(pkg):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def import_edges(root: str) -> list[tuple[str, str, str, int]]:
    """(from layer, to layer, from module, line) of every cross-package verl_mega import."""
    edges = []
    for module, path in package_modules(root):
        src = layer_of(module)
        for target, line in module_imports(path, module):
            dst = layer_of(target)
            if src and dst and src != dst:
                edges.append((src, dst, module, line))
    return edges


def allowed(src: str, dst: str) -> bool:
    """Whether package `src` may import package `dst` (see the module docstring)."""
    if src == "__main__":  # the `python -m verl_mega` entry point
        return dst == "apps"
    if src in SIDE or src in BASE:
        return (dst in BASE and dst != src) or dst in SIDE_USES.get(src, ())
    if src in CHAIN:
        return dst in SIDE or dst in BASE or (dst in CHAIN and CHAIN[dst] < CHAIN[src])
    return False


def test_no_package_imports_a_higher_layer():
    bad = [f"{module}:{line} ({src} -> {dst})" for src, dst, module, line in import_edges(ROOT)
           if not allowed(src, dst)]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_models_import_nothing_above_them_at_run_time():
    code = ("import sys, verl_mega.models; print(sorted({m.split('.')[1] for m in sys.modules "
            "if m.startswith('verl_mega.') and m.count('.') >= 1}))")
    env = child_env()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert "models" in loaded
    assert not loaded & {"rollout", "hybrid_engine", "trainer", "apps"}, loaded


def print_graph(root: str) -> None:
    counts = Counter((src, dst) for src, dst, _, _ in import_edges(root))
    for (src, dst), n in sorted(counts.items(), key=lambda kv: (-CHAIN.get(kv[0][0], 0), kv[0])):
        flag = "" if allowed(src, dst) else "   <-- against the layer order"
        print(f"  {src:>14} -> {dst:<14} {n:3d} import(s){flag}")


if __name__ == "__main__":
    print_graph(sys.argv[1] if len(sys.argv) > 1 else ROOT)
