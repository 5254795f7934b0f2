"""MkDocs hooks of the documentation (``hooks:`` in mkdocs.yml).

1. The CLI reference: the page holding ``<!-- cli-reference -->`` gets, in its place, every
   command of ``geoupsample.cli.app`` with its usage, help and options, read from the commands
   themselves (the same records ``--help`` prints), so the page cannot drift from the CLI.
2. The notebooks: each ``notebooks/*.ipynb`` becomes a page (rendered by mkdocs-jupyter) with
   the outputs of a fresh execution. A notebook is executed with nbclient once per version of
   its cells and of the package's code, into a cache (``.cache/docs-notebooks``, or
   ``$GEOUPSAMPLE_DOCS_CACHE``), and later builds reuse it. ``GEOUPSAMPLE_DOCS_NOTEBOOKS=stored``
   renders the notebooks with whatever outputs they store instead (a quick preview). Warnings
   printed on stderr are left out of the pages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CLI_MARKER = "<!-- cli-reference -->"

# --- 1. the CLI reference -----------------------------------------------------------------

#: Trailing ``  [default: 50]``, ``  [x>=1]``, ``  [required]`` of a help record.
_EXTRAS = re.compile(r"\s*\[([^\[\]]*)\]\s*$")


def _md(text: str) -> str:
    """Plain help text as Markdown that shows it as written (no HTML, emphasis or cells)."""
    text = text.replace("\\", "\\\\")
    for char in "*_[]|":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    return " ".join(_md(text).split())


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _option_row(param: Any, ctx: Any) -> str | None:
    record = param.get_help_record(ctx)
    if record is None:  # hidden
        return None
    names, help_text = record
    extras: list[str] = []
    while match := _EXTRAS.search(help_text):
        extras[:0] = [e.strip() for e in match.group(1).split(";")]
        help_text = help_text[: match.start()]
    default = next((e.split(":", 1)[1].strip() for e in extras if e.startswith("default:")), "")
    notes = [e for e in extras if not e.startswith("default:")]
    if getattr(param, "param_type_name", "") == "argument":
        name = param.metavar or param.name.upper()
        value = names[len(name):].strip()
        shown = [name]
    else:
        tokens = names.split(" ")
        shown = []
        while tokens and tokens[0].startswith("-"):
            shown.append(tokens.pop(0).rstrip(","))
            if tokens and tokens[0] == "/":
                tokens.pop(0)
        value = " ".join(tokens)
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    if "|" in value:
        value = ", ".join(_code(v) for v in value.split("|"))
    else:
        value = _cell(value)
    description = _cell(help_text)
    if notes:
        description += " " + "; ".join(f"*{_cell(n)}*" for n in notes)
    return (f"| {', '.join(_code(s) for s in shown)} | {value} | {_code(default)} "
            f"| {description} |")


def _command_markdown(command: Any, path: list[str], parent: Any, level: int) -> list[str]:
    ctx = command.context_class(command, info_name=path[-1], parent=parent)
    lines = [f"{'#' * level} {' '.join(path)}", "", "```text", command.get_usage(ctx), "```", ""]
    for paragraph in (command.help or "").split("\n\n"):
        if paragraph.strip():
            lines += [" ".join(_md(paragraph).split()), ""]
    rows = [row for p in command.get_params(ctx)
            if p.name != "help" and (row := _option_row(p, ctx))]  # every command has --help
    if rows:
        lines += ["| Argument / option | Value | Default | Description |",
                  "|---|---|---|---|", *rows, ""]
    for name in getattr(command, "list_commands", lambda _: [])(ctx):
        sub = command.get_command(ctx, name)
        if sub is not None and not sub.hidden:
            lines += _command_markdown(sub, [*path, name], ctx, level + 1)
    return lines


def cli_reference() -> str:
    """Markdown for every command of the ``geoupsample`` CLI, from the commands themselves."""
    import typer

    from geoupsample.cli import app

    return "\n".join(_command_markdown(typer.main.get_command(app), ["geoupsample"], None, 2))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown


# --- 2. the notebooks ---------------------------------------------------------------------


#: Bump when what :func:`_execute` stores changes, so that cached notebooks are redone.
CACHE_FORMAT = "2"


def _cache_root() -> Path:
    return Path(os.environ.get("GEOUPSAMPLE_DOCS_CACHE", ROOT / ".cache" / "docs-notebooks"))


def _code_digest() -> str:
    """A digest of the package's code: a notebook whose outputs predate a change is rerun."""
    h = hashlib.sha256()
    for package in ("geoupsample", "tiling"):
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _notebook_key(path: Path, code: str) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    h = hashlib.sha256(f"{CACHE_FORMAT}:{code}".encode())
    for cell in cells:
        source = cell["source"]
        h.update(cell["cell_type"].encode())
        h.update(("".join(source) if isinstance(source, list) else source).encode())
    return h.hexdigest()[:16]


def _execute(src: Path, dest: Path) -> None:
    """Run ``src`` top to bottom in a scratch folder; write the executed notebook to ``dest``."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(src, as_version=4)
    with tempfile.TemporaryDirectory(prefix="docs-nb-") as work:
        client = NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": work}})
        try:
            client.execute()
        except CellExecutionError as err:
            raise PluginError(f"notebook {src.name} failed to execute:\n{err}") from None
    for cell in nb.cells:  # warnings on stderr (tqdm's, say) are noise on a page
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.output_type == "stream" and o.name == "stderr")]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, dest)


def executed_notebooks() -> list[tuple[Path, Path]]:
    """``(source notebook, folder holding notebooks/<name>.ipynb executed)`` for each notebook,
    executing those the cache lacks (two at a time)."""
    sources = sorted(NOTEBOOKS.glob("*.ipynb"))
    if os.environ.get("GEOUPSAMPLE_DOCS_NOTEBOOKS", "execute") == "stored":
        return [(src, ROOT) for src in sources]
    root, code = _cache_root(), _code_digest()
    plan = []
    for src in sources:
        folder = root / f"{src.stem}-{_notebook_key(src, code)}"
        plan.append((src, folder, folder / "notebooks" / src.name))
    missing = [(src, dest) for src, _, dest in plan if not dest.exists()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(_execute, src, dest) for src, dest in missing]:
            future.result()
    for src, folder, _ in plan:  # drop the outputs of older versions of each notebook
        for old in root.glob(f"{src.stem}-*"):
            if old != folder and old.is_dir() and len(old.name) == len(folder.name):
                shutil.rmtree(old, ignore_errors=True)
    return [(src, folder) for src, folder, _ in plan]


@event_priority(100)  # before mkdocs-jupyter wraps the .ipynb files as pages
def on_files(files: Files, config: Any) -> Files:
    for src, folder in executed_notebooks():
        uri = f"notebooks/{src.name}"
        if files.get_file_from_path(uri) is not None:
            files.remove(files.get_file_from_path(uri))
        files.append(File(uri, src_dir=str(folder), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
