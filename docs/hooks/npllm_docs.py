"""MkDocs hooks that keep npllm's docs true to the code (configured in mkdocs.yml).

Five directives in the Markdown pages, all resolved at build time so nothing can drift
(and links to the repository's source files, which the site cannot serve, become links to the
API reference or plain paths):

- ``<!-- source: npllm.equations.attention.attention_pattern -->`` becomes the function's real
  source, with its file and line numbers (``inspect.getsourcelines``);
- ``<!-- test: tests/test_equations_attention.py::test_sdpa_matches_torch_is_causal -->``
  becomes that test's source, decorators included (found with ``ast``);
- a fenced block opened with ```` ```python exec ```` is run (blocks of one page share their
  variables, like notebook cells), shown as code, followed by what it printed and by every
  image file it wrote, which becomes a figure of the site (``figures/<page>-<file>``). Plots in
  the docs are therefore drawn by npllm from the real default model at every build (GIF
  animations too). Files in ``docs/data/`` are in the examples' working folder;
- a fenced block opened with ```` ```console exec ```` runs each ``$ npllm ...`` line with
  npllm's command line, in process, and shows it followed by what it printed;
- ``<!--= expression -->`` in a sentence becomes the expression's value, evaluated after the
  examples above it ran: ``the product is <!--= f"{p:.1e}" -->``.

A missing function or test, or an exception in an example, fails the build. So does a number
in a sentence that no example printed (:func:`check_numbers`): numbers that look measured
(decimals, percentages, thousands separators) must come from the code, or be declared on the
page as fixed inputs (``<!-- numbers: 0.2 0.9 -->``, e.g. the lecture's settings).

The build runs without torch: ``torch`` and ``transformers`` cannot be imported while it runs,
so the examples prove the walkthrough works with NumPy alone. ``npllm.load`` is memoised for the
build (every page uses the same default model; loading it once keeps the build fast), and
``HF_HUB_OFFLINE`` defaults to 1, so the pages are built from the embedded Q4_1 model.

MathJax, which renders the formulas, comes from the ``django-static-mathjax`` package (MathJax
3.2.2's files, no Django needed); :func:`on_files` adds its single-file TeX-to-HTML component
and its fonts to the site, so formulas render offline, without any CDN.
"""
import ast
import contextlib
import functools
import importlib
import importlib.abc
import inspect
import io
import os
import re
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

# One thread for BLAS and Numba, set before NumPy loads: the examples multiply small matrices,
# where a second thread gains little, and on a shared 2-core machine (CI runs the test suite
# in two workers beside this build) two spinning BLAS threads made a forward pass 3 to 20 times
# slower. The build's numbers do not depend on it.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

ROOT = Path(__file__).resolve().parents[2]
MATHJAX = "django-static-mathjax"
MATHJAX_FILES = ("es5/tex-chtml-full.js", "es5/output/chtml/fonts/woff-v2/")
BLOCKED = ("torch", "transformers")
SOURCE = re.compile(r"^<!-- source: ([\w.]+) -->$", re.M)
TEST = re.compile(r"^<!-- test: ([\w/.]+)::(\w+) -->$", re.M)
EXEC = re.compile(r"^```(python|console) exec\n(.*?)^```$", re.M | re.S)
IMAGES = (".png", ".svg", ".gif")
VALUE = re.compile(r"<!--=\s*(.*?)\s*-->", re.S)
DECLARED = re.compile(r"<!-- (?:numbers|recorded): (.*?)-->", re.S)
# Numbers that look measured: 2.4316e-11, 41.0226, 59%, 3.7x, 134,515,008 (not 576, 2024, 0.1.0).
NUMBER = re.compile(r"(?<![\w.])(?:\d+\.\d+(?:e[-+]?\d+)?(?:%|x(?!\w))?|\d+%|\d{1,3}(?:,\d{3})+)"
                    r"(?!\.?\w)")
DATA = Path(__file__).resolve().parents[1] / "data"
# Pages of dated measurements (bench runs on one machine, each with its command): their
# numbers are records, not what the code prints at build time.
RECORDED_PAGES = ("performance.md",)


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes ``import torch`` / ``import transformers`` fail, as on a machine without them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (the docs build runs without "
                                      f"torch: npllm needs NumPy only)", name=name)
        return None


def on_config(config):
    # The pages describe the embedded default model (the wheel's Q4_1 GGUF): build from it, not
    # from whatever the Hub or its cache would give, unless HF_HUB_OFFLINE is set explicitly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[name]
    if not any(isinstance(f, _Blocker) for f in sys.meta_path):
        sys.meta_path.insert(0, _Blocker())
    import npllm
    if not hasattr(npllm.load, "cache_info"):
        npllm.load = functools.lru_cache(maxsize=4)(npllm.load)
    return config


def on_files(files, config):
    try:
        dist = distribution(MATHJAX)
    except PackageNotFoundError:
        raise PluginError(f"the docs render formulas with MathJax from the {MATHJAX} package: "
                          f"pip install -e '.[docs]'") from None
    found = 0
    for f in dist.files:
        path = str(f)
        if "/es5/" not in path:
            continue
        rel = path.split("/es5/", 1)[1]
        if any(("es5/" + rel).startswith(p) for p in MATHJAX_FILES):
            files.append(File.generated(config, f"assets/mathjax/{rel}",
                                        abs_src_path=str(dist.locate_file(f))))
            found += 1
    if found < 2:
        raise PluginError(f"the {MATHJAX} package does not hold {MATHJAX_FILES}")
    return files


def on_page_markdown(markdown, page, config, files):
    started = time.perf_counter()
    markdown = _repository_links(markdown, page, config)
    pulled = []  # the code pulled from files: numbers in it may be quoted in prose

    def pull(block):
        pulled.append(block)
        return block
    markdown = SOURCE.sub(lambda m: pull(_source_block(m.group(1), page)), markdown)
    markdown = TEST.sub(lambda m: pull(_test_block(m.group(1), m.group(2), page)), markdown)
    if EXEC.search(markdown) or VALUE.search(markdown):
        markdown = _run_page(markdown, page, config, files, pulled)
    else:
        check_numbers(markdown, "\n".join(pulled), page.file.src_uri)
    seconds = time.perf_counter() - started
    if os.environ.get("NPLLM_DOCS_TIMES"):
        print(f"npllm docs: {page.file.src_uri}: {seconds:.1f} s", file=sys.stderr)
    return markdown


# -- links to the repository's files ---------------------------------------------------------

# Modules with a page in the API reference (docs/reference/): links to them become links there.
REFERENCE_MODULES = re.compile(
    r"^npllm\.(equations(\.\w+)?|trace|inspect|plot|animate|model\.llama)$")
LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")
FENCE = re.compile(r"^```.*?^```$", re.M | re.S)


def _repository_links(markdown, page, config):
    """Links to source files outside docs/ (``[x](../npllm/score.py)``, handy when the Markdown
    is read on a forge) cannot be followed in the site: a module with an API page becomes a
    link to that page, any other file its path in code."""
    docs = Path(config["docs_dir"]).resolve()
    here = (docs / page.file.src_uri).parent

    def rewrite(match):
        text, target = match.group(1), match.group(2)
        if "://" in target or target.startswith("mailto:"):
            return match.group(0)
        path = (here / target).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(ROOT) or not path.exists():
            return match.group(0)
        rel = path.relative_to(ROOT).as_posix()
        module = rel[:-3].replace("/", ".") if rel.endswith(".py") else ""
        if REFERENCE_MODULES.match(module):
            return f"[{text}][{module}]"
        return text if f"`{rel}`" in text or text == rel else f"{text} (`{rel}`)"

    out, last = [], 0
    for fence in FENCE.finditer(markdown):  # leave code blocks alone
        out += [LINK.sub(rewrite, markdown[last:fence.start()]), fence.group(0)]
        last = fence.end()
    out.append(LINK.sub(rewrite, markdown[last:]))
    return "".join(out)


# -- source and test blocks ------------------------------------------------------------------

def _fence(code, path, first_line):
    return (f'```python title="{path}, line {first_line}" linenums="{first_line}"\n'
            f"{code.rstrip()}\n```")


def _source_block(dotted, page):
    """The source of ``dotted``: a module's function or class, or a class's method."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except ImportError:  # module.Class.method
            module_name, _, cls = module_name.rpartition(".")
            obj = getattr(getattr(importlib.import_module(module_name), cls), attr)
        lines, first = inspect.getsourcelines(obj)
        path = Path(inspect.getsourcefile(obj)).resolve().relative_to(ROOT)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise PluginError(f"{page.file.src_uri}: cannot pull the source of {dotted}: {e}") from e
    return _fence("".join(lines), path.as_posix(), first)


def _test_block(rel_path, name, page):
    path = ROOT / rel_path
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PluginError(f"{page.file.src_uri}: no test file {rel_path}: {e}") from e
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = source.splitlines()[first - 1:node.end_lineno]
            return _fence("\n".join(lines), rel_path, first)
    raise PluginError(f"{page.file.src_uri}: {rel_path} has no test named {name}")


# -- executed examples -----------------------------------------------------------------------

def _run_page(markdown, page, config, files, pulled=()):
    namespace = {"__name__": "__main__"}
    slug = Path(page.file.src_uri).with_suffix("").as_posix().replace("/", "-")
    page_dir = Path(page.file.src_uri).parent
    generated = list(pulled)  # what the code printed, computed or is: what prose may quote
    with tempfile.TemporaryDirectory(prefix="npllm-docs-") as tmp:
        if DATA.is_dir():  # input files the examples read (e.g. scoring.md's sentences.txt)
            for f in DATA.iterdir():
                if f.is_file():
                    shutil.copy(f, tmp)
        out = []
        last = 0
        for n, match in enumerate(EXEC.finditer(markdown)):
            prose = _values(markdown[last:match.start()], namespace, page, generated)
            out.append(prose)
            last = match.end()
            kind, code = match.group(1), match.group(2)
            if kind == "console":
                shown = _run_console(code, Path(tmp), page, n)
                generated.append(shown)
                out.append(f"```console\n{shown.rstrip()}\n```\n")
                continue
            printed, images = _run_block(code, namespace, Path(tmp), page, n)
            generated += [code, printed]
            out.append(f"```python\n{code.rstrip()}\n```\n")
            if printed.strip():
                out.append(f'```text title="output"\n{printed.rstrip()}\n```\n')
            for image in images:
                dest = f"figures/{slug}-{image.name}"
                files.append(File.generated(config, dest, content=image.read_bytes()))
                link = os.path.relpath(dest, page_dir if str(page_dir) != "." else ".")
                out.append(f"\n![{image.stem}]({Path(link).as_posix()})\n")
                image.unlink()
        out.append(_values(markdown[last:], namespace, page, generated))
    result = "".join(out)
    check_numbers(result, "\n".join(generated), page.file.src_uri)
    return result


def _values(prose, namespace, page, generated):
    """``<!--= expression -->`` in prose becomes the expression's value (str), evaluated in the
    page's namespace as the examples above it left it: a number in a sentence comes from the
    code, at every build."""
    def value(match):
        try:
            text = str(eval(match.group(1), namespace))
        except Exception as e:
            raise PluginError(f"{page.file.src_uri}: the value <!--= {match.group(1)} --> "
                              f"failed: {type(e).__name__}: {e}") from e
        generated.append(text)
        return text
    return VALUE.sub(value, prose)


def _run_console(code, workdir, page, n):
    """Run each ``$ npllm ...`` line of a console block with npllm's CLI, in process (the
    build's memoised model), and show it followed by what it printed on stdout."""
    from npllm.cli import main
    shown = []
    cwd = os.getcwd()
    for line in code.splitlines():
        shown.append(line)
        if not line.startswith("$ "):
            continue
        argv = shlex.split(line[2:], comments=True)
        if argv[:1] != ["npllm"]:
            raise PluginError(f"{page.file.src_uri}: console example {n + 1} runs only npllm "
                              f"commands, got {line!r}")
        stdout = io.StringIO()
        try:
            os.chdir(workdir)
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
                try:
                    status = main(argv[1:])
                except SystemExit as e:  # argparse's --help and --version exit
                    status = e.code or 0
        finally:
            os.chdir(cwd)
        if status:
            raise PluginError(f"{page.file.src_uri}: console example {n + 1}: {line!r} "
                              f"exited with {status}")
        shown.append(stdout.getvalue().rstrip("\n"))
    return "\n".join(shown)


def _prose(markdown):
    """The sentences of a page: no code blocks, inline code, formulas or HTML comments."""
    text = FENCE.sub("", markdown)
    for pattern in (r"`[^`\n]*`", r"\$\$.*?\$\$", r"\$[^$\n]*\$", r"<!--.*?-->", r"\]\([^)]*\)"):
        text = re.sub(pattern, "", text, flags=re.S)
    return text


def check_numbers(markdown, generated, name):
    """Fail the build when a sentence states a number the code did not print.

    Numbers that look measured (a decimal point, a percent sign, thousands separators) in the
    prose of a page with examples must appear in what the page's examples printed or computed
    (their outputs, their code, ``<!--= ... -->`` values, the source and tests the page pulls),
    or be declared on the page: fixed inputs with ``<!-- numbers: 0.2 0.9 (the lecture's
    settings) -->``, a dated measurement with ``<!-- recorded: 7.6 13.1 (command, date) -->``.
    So a number copied from an old run cannot silently drift from what the code prints today.
    """
    if name in RECORDED_PAGES:
        return
    declared = set()
    for match in DECLARED.finditer(markdown):
        declared.update(NUMBER.findall(match.group(1)))
    known = set(NUMBER.findall(generated))
    missing = [x for x in NUMBER.findall(_prose(markdown)) if x not in known | declared]
    if missing:
        raise PluginError(f"{name}: the prose states {', '.join(dict.fromkeys(missing))}, which "
                          f"no example on the page printed: compute it with <!--= expression -->, "
                          f"run the command in a console exec block, or declare a fixed input "
                          f"with <!-- numbers: ... -->")


def _run_block(code, namespace, workdir, page, n):
    before = {p: p.stat().st_mtime_ns for p in workdir.iterdir()}
    stdout = io.StringIO()
    cwd = os.getcwd()
    started = time.perf_counter()
    try:
        os.chdir(workdir)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            exec(compile(code, f"<{page.file.src_uri}, example {n + 1}>", "exec"), namespace)
    except Exception as e:  # an example that fails must fail the build
        raise PluginError(f"{page.file.src_uri}: example {n + 1} failed: "
                          f"{type(e).__name__}: {e}\n{textwrap.indent(code, '    ')}") from e
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - started
    if seconds > 2 and os.environ.get("NPLLM_DOCS_TIMES"):
        print(f"npllm docs: {page.file.src_uri}, example {n + 1}: {seconds:.1f} s",
              file=sys.stderr)
    images = sorted((p for p in workdir.iterdir()
                     if p.suffix in IMAGES and before.get(p) != p.stat().st_mtime_ns),
                    key=lambda p: p.stat().st_mtime_ns)
    return stdout.getvalue(), images
