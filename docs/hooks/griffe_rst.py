"""A griffe extension for npllm's API pages: the reStructuredText bits of the docstrings
(written to read well in ``help()`` and in the source) turned into the Markdown that
mkdocstrings renders.

- ``.. math::`` followed by an indented block becomes a ``$$ ... $$`` display formula
  (rendered by MathJax through pymdownx.arithmatex);
- ``:math:`x``` becomes ``$x$``;
- ``:func:`f```, ``:class:`C```, ``:mod:`m```, ``:data:`d```, ``:meth:`m``` become code;
- a paragraph ending in ``::`` ends in ``:`` (its indented block is already a code block).
"""
import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj):`~?([^`]+)`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")


def rst_to_markdown(text):
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped == ".. math::":
            indent = len(line) - len(line.lstrip())
            body = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            pad = " " * indent
            out += [f"{pad}$$", *(f"{pad}{b}" for b in body if b), f"{pad}$$", ""]
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            line = line[:-1]
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, node, obj, agent, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
