"""The code's layout keeps its promises: the reference forward pass stays short and speaks of no
engine concept, imports point down (no cycles), nothing under npllm/ imports torch, and the repo
refers to no file outside itself."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "npllm"
ENGINE_WORDS = re.compile(r"packed|fused|fusion|thread|blas|numba|kernel|spin", re.I)


def modules():
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


def imported(name, path, tree, known):
    """The npllm modules ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name and t != "npllm"
                  and not name.startswith(t + ".")}
    return found


def complexity(function):
    """McCabe's number as ruff's C901 counts it: 1 + branches + extra boolean operands."""
    branches = (ast.If, ast.For, ast.While, ast.IfExp, ast.ExceptHandler, ast.comprehension)
    return 1 + sum(isinstance(n, branches) + (len(n.values) - 1 if isinstance(n, ast.BoolOp)
                                              else 0) for n in ast.walk(function))


REFERENCES = ["npllm.model.llama", "npllm.model.stablelm", "npllm.model.phi3", "npllm.model.qwen2",
              "npllm.model.gpt2", "npllm.training.backprop"]


@pytest.mark.parametrize("module", REFERENCES)
def test_the_reference_forward_is_short_simple_and_engine_free(module):
    """Each family's forward pass (and the training's) reads like its diagram: at most ~70
    lines, complexity 10 at most, no engine concept; Llama's calls the lecture's equations."""
    import importlib
    import inspect
    source = inspect.getsource(importlib.import_module(module).forward)
    tree = ast.parse(source).body[0]
    body = ast.get_source_segment(source, tree).replace(ast.get_docstring(tree), "")
    code = [line for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(code) <= 70, len(code)
    assert complexity(tree) <= 10
    assert not ENGINE_WORDS.findall(body), ENGINE_WORDS.findall(body)
    if module == "npllm.model.llama":
        for equation in ("rms_norm", "apply_rope", "grouped_query_attention", "swiglu_mlp",
                         "lm_head"):
            assert f"{equation}(" in body, equation


def test_no_import_cycles():
    known = modules()
    graph = {name: imported(name, *known[name], known) for name in known}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_reference_side_imports_nothing_of_the_engine():
    """Arrows point down: the reference (model/, equations/) never imports the engine, except
    where ``npllm.load`` and ``Model`` make one."""
    known = modules()
    for name, (path, tree) in known.items():
        if name.startswith(("npllm.equations", "npllm.model")) and name not in (
                "npllm.model", "npllm.model.model"):
            assert not any(t.startswith(("npllm.engine", "npllm.kernels"))
                           for t in imported(name, path, tree, known)), name


def test_nothing_under_npllm_imports_torch():
    for path in PACKAGE.rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(torch|transformers)\b",
                             path.read_text(encoding="utf-8"), re.M), path


def test_the_repo_refers_to_no_file_outside_itself():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if Path(name).suffix in (".py", ".md", ".yml", ".cfg", ".toml") or name == "Makefile":
            text = (ROOT / name).read_text(encoding="utf-8")
            for outside in ("DESIGN" + ".md", "../" + "shared"):  # spelled so: not in this file
                assert outside not in text, (name, outside)


def test_the_docs_show_the_reference_forward_pass():
    """docs/forward.md pulls the function's source; the attention lines quoted on the
    grouped-query page are lines of that function, as written."""
    import inspect

    from npllm.model import llama
    assert "<!-- source: npllm.model.llama.forward -->" in (ROOT / "docs/forward.md").read_text()
    page = (ROOT / "docs/eq/grouped-query-attention.md").read_text()
    quoted = re.search(r"```python\n(q = split_heads.*?)```", page, re.S).group(1)
    source = [line.strip() for line in inspect.getsource(llama.forward).splitlines()]
    for line in quoted.strip().splitlines():
        assert line.strip() in source, line
