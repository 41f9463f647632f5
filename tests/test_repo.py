"""The tree itself: pushable to a Hugging Face Space, no import circle, modules of a readable size."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "miva"
MAX_LINES = 400
LONG_REASON = "Kept as one module"  # a longer module's docstring says why, starting with these words


def push_space():
    spec = importlib.util.spec_from_file_location("push_space", ROOT / "scripts" / "push_space.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tree_pushes_to_a_space_as_it_is():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "push_space.py"), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr  # no tracked file over 10 MB


def test_a_file_over_10_mb_stops_the_push_before_it_starts(tmp_path, monkeypatch):
    script = push_space()
    (tmp_path / "weights.safetensors").write_bytes(b"\0" * (script.MAX_BYTES + 1))
    (tmp_path / "app.py").write_text("")
    monkeypatch.setattr(script, "ROOT", tmp_path)
    monkeypatch.setattr(script, "tracked_files", lambda: ["app.py", "weights.safetensors"])
    assert script.too_big(["app.py", "weights.safetensors"]) == ["weights.safetensors (10.0 MB)"]
    assert script.main(["--repo", "you/space"]) == 1  # refused before any network call


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (functions included), resolved to modules."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target in modules:
                found.add(target)
                if isinstance(node, ast.ImportFrom):
                    break  # `from m import a`: a submodule a, or else names of m
    return found - {name}


def test_no_import_circle():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    assert graph["miva.toy.base"] >= {"miva.backends.base"}  # the resolver sees relative imports
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_modules_are_short_or_say_why():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")) + [ROOT / "app.py"]:
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and LONG_REASON not in doc:
            long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not long, f"split these or say in their docstring why not ('{LONG_REASON} ...'): {long}"
