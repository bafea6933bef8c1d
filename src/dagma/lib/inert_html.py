"""An executed notebook's HTML made inert: no script, handler, remote load, frame or form.

A notebook's outputs and markdown are written by whoever wrote the notebook or the data it
printed, so its HTML copy is cleaned before it is stored and again before the app shows it
(which also covers copies written before this rule). nbconvert's page keeps its `<head>` styles
and loses its scripts; everything inside `<main>` (the cells) goes through ammonia (`nh3`) with
an allow-list that keeps what a report needs: markdown, tables, highlighted code, inline
images (`data:image/...`, as nbconvert embeds plots). A Content-Security-Policy in the page
refuses scripts and remote loads in the browser as well.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING

import nh3

if TYPE_CHECKING:
    from nbformat import NotebookNode

# What the browser may load or run for the page: inline styles and data: images, nothing else.
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
    "form-action 'none'; base-uri 'none'"
)
_HEAD = (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
)
_BODY = (
    '<body class="jp-Notebook" data-jp-theme-light="true" '
    'data-jp-theme-name="JupyterLab Light">\n<main>\n'
)
_TAIL = "\n</main>\n</body>\n</html>\n"

# Style properties that take no url(), so a cell cannot load anything through its styles.
_STYLE_PROPERTIES = {
    "color",
    "background-color",
    "text-align",
    "vertical-align",
    "font-weight",
    "font-style",
    "font-size",
    "font-family",
    "white-space",
    "text-decoration",
    "width",
    "max-width",
    "min-width",
    "height",
    "max-height",
    "padding",
    "padding-left",
    "padding-right",
    "margin",
    "margin-left",
    "margin-right",
    "border",
    "border-collapse",
    "border-bottom",
    "border-top",
    "border-left",
    "border-right",
    "display",
    "overflow",
    "overflow-x",
}
_ATTRIBUTES = {
    **{tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()},
    "*": {"class", "id", "title", "style", "lang", "dir", "align"},
    "a": {"href", "title", "name"},
    "img": {"src", "alt", "width", "height"},
    "table": {"border", "align"},
}


def _url_filter(tag: str, attribute: str, value: str) -> str | None:
    """Images only from data: (nothing remote); links never to data: or script."""
    url = value.strip().lower()
    if attribute == "src":
        return value if tag == "img" and url.startswith("data:image/") else None
    if attribute == "href" and url.startswith("data:"):
        return None
    return value


_CELLS = nh3.Cleaner(
    tags=set(nh3.ALLOWED_TAGS) - {"map", "area"},
    clean_content_tags={"script", "style"},
    attributes=_ATTRIBUTES,
    attribute_filter=_url_filter,
    generic_attribute_prefixes={"data-"},
    url_schemes={"http", "https", "mailto", "data"},
    filter_style_properties=_STYLE_PROPERTIES,
)
# nbconvert's own head, kept for its title and styles only.
_HEAD_CLEANER = nh3.Cleaner(tags={"title", "style"}, clean_content_tags={"script"}, attributes={})


def inert_cells(fragment: str) -> str:
    """An HTML fragment from a notebook with everything active removed."""
    return _CELLS.clean(fragment)


def inert_document(html: str) -> str:
    """A whole nbconvert page made inert; idempotent, so a cleaned copy may be cleaned again.

    nbconvert's lab template puts every cell between its first `<main>` and its last `</main>`;
    before that comes its own head, which no cell can reach. A page without `<main>` is treated
    as cells throughout.
    """
    head, found, rest = html.partition("<main>")
    if not found:
        head, rest = "", html
    cells, _, _ = rest.rpartition("</main>") if "</main>" in rest else (rest, "", "")
    return (
        _HEAD
        + _HEAD_CLEANER.clean(head).strip()
        + "\n</head>\n"
        + _BODY
        + inert_cells(cells).strip()
        + _TAIL
    )


# `<` before what could open a tag, comment or autolink; `![`, which opens an image.
_ACTIVE_MARKDOWN = re.compile(r"<(?=[A-Za-z/!?])|!(?=\[)")


def inert_markdown(text: str) -> str:
    """Model or corpus text as markdown that shows no image and no raw HTML.

    An image would be fetched as soon as the text is shown, so a link planted in the corpus
    could send the conversation away in its URL. `![` and `<tag` are escaped and read as
    written; emphasis, lists, code and links stay.
    """
    return _ACTIVE_MARKDOWN.sub(lambda m: "\\<" if m[0] == "<" else "!\\", text)


# What an output may show in a viewer we do not control: text and raster images.
_SHOWN = ("text/plain", "image/png", "image/jpeg", "image/gif")


def inert_notebook(notebook: NotebookNode) -> NotebookNode:
    """A copy of an executed notebook that renders inert in any nbconvert, such as the one in
    Dagster's notebook viewer (which shows outputs as they are, on Dagster's own origin).

    HTML outputs are cleaned as in the HTML copy and markdown is escaped as in the app;
    scripts, widgets, SVG and raw cells are left out, each output keeping its text.
    """
    notebook = copy.deepcopy(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source = inert_markdown(cell.source)
            cell.pop("attachments", None)
        elif cell.cell_type == "raw":
            cell.metadata.pop("format", None)
            cell.metadata.pop("raw_mimetype", None)
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data is None:
                continue
            kept = {mime: data[mime] for mime in _SHOWN if mime in data}
            if "text/html" in data:
                kept["text/html"] = inert_cells(_text(data["text/html"]))
            if "text/markdown" in data:
                kept["text/markdown"] = inert_markdown(_text(data["text/markdown"]))
            if not kept:
                kept["text/plain"] = f"(not shown here: {', '.join(sorted(data))})"
            output["data"] = kept
    return notebook


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)
