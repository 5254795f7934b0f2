"""A Griffe extension for the API reference: the reST bits of our docstrings, as Markdown.

The docstrings are Google style with a few reStructuredText habits that Markdown would show
literally. Before mkdocstrings renders a docstring this rewrites

- cross-reference roles, ``:func:`~tiling.run``` and the like, into optional autorefs: a link
  where the target is on a page of the reference, inline code otherwise (never a warning);
- doctest lines (``>>> ...``) into fenced ``pycon`` blocks;
- literal blocks introduced by ``::`` into fenced ``python`` blocks.

Only the text changes; the package is not touched.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([^`<>]+)`")


def _target(name: str, obj: griffe.Object) -> str:
    """The full dotted path a role names, resolved against the object it appears in."""
    name = name.strip().lstrip(".")
    if name.split(".", 1)[0] in {"geoupsample", "tiling"}:
        return name
    scope = obj if obj.is_module or obj.is_class else obj.parent
    while scope is not None:
        head = name.split(".", 1)[0]
        if head in scope.members:
            return f"{scope.path}.{name}"
        scope = scope.parent
    return f"{obj.module.path}.{name}"


def roles_to_autorefs(text: str, obj: griffe.Object) -> str:
    """``:func:`~a.b.c``` -> an optional autoref titled ``c`` (``a.b.c`` without the tilde);
    fenced code is left alone."""

    def replace(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2).strip()
        title = name.rsplit(".", 1)[-1] if short else name
        target = _target(name, obj)
        return (f'<autoref identifier="{html.escape(target)}" optional>'
                f"<code>{html.escape(title)}</code></autoref>")

    out, in_fence = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        out.append(line if in_fence else ROLE.sub(replace, line))
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def fence_examples(text: str) -> str:
    """Doctest runs -> ```pycon fences; ``::`` literal blocks -> ```python fences."""
    lines = text.split("\n")
    out: list[str] = []
    i, in_fence, examples = 0, False, None  # examples: indent of a Google "Examples:" header
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        pad = line[: _indent(line)]
        if examples is not None and stripped and _indent(line) <= examples:
            examples = None
        if re.fullmatch(r"Examples?:", stripped):
            examples = _indent(line)  # Griffe renders that section's doctests itself
        elif stripped.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and examples is None and stripped.startswith(">>>"):
            if out and out[-1].strip():
                out.append("")
            out.append(f"{pad}```pycon")
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= len(pad):
                out.append(lines[i])
                i += 1
            out += [f"{pad}```", ""]
            continue
        elif not in_fence and stripped.endswith("::"):
            # reST: "text::" reads "text:" and opens a literal block; "::" alone vanishes
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            depth = _indent(lines[j]) if j < len(lines) else 0
            if j < len(lines) and depth > len(pad):
                out.append(line[:-1] if stripped != "::" else "")
                block: list[str] = []
                while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) >= depth):
                    block.append(lines[j][depth:])
                    j += 1
                while block and not block[-1].strip():
                    block.pop()
                out += ["", f"{pad}```python", *(f"{pad}{b}" if b else "" for b in block),
                        f"{pad}```", ""]
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RestToMarkdown(griffe.Extension):
    """Rewrite each docstring's reST roles, doctests and literal blocks as Markdown."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        obj.docstring.value = roles_to_autorefs(fence_examples(obj.docstring.value), obj)
