"""An executed notebook's HTML copy keeps its report and loses everything active."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from nbconvert import HTMLExporter

from dagma.lib.inert_html import CSP, inert_document
from dagma.notebooks.runner import execute, viewer_copy
from dagma.notebooks.spec import parse_notebook
from tests.notebooks.test_runner import target
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

# What a hostile output or markdown cell would do; none of it may reach the stored copy.
HOSTILE = (
    "<script>document.title = 'ran'</script>"
    "<img src=x onerror=\"document.title = 'ran'\">"
    "<a href=\"javascript:document.title = 'ran'\">click</a>"
    '<img src="http://attacker.example/pixel.png">'
    '<link rel="stylesheet" href="http://attacker.example/style.css">'
    "<style>body { background: url(http://attacker.example/bg.png) }</style>"
    '<p style="color: red; background-image: url(http://attacker.example/p.png)">styled</p>'
    '<iframe src="http://attacker.example/frame"></iframe>'
    '<form action="http://attacker.example/post"><input name="q"></form>'
)
BODY = f"""
import io

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import HTML, Image, Javascript, Markdown, display

matplotlib.use("Agg")

display(HTML({HOSTILE!r}))
display(Markdown("![leak](http://attacker.example/md.png) and **bold**"))
display(Javascript("document.title = 'ran'"))
display(pd.DataFrame({{"alcohol": [13.2, 12.1], "label": ["red", "white"]}}))
figure, axes = plt.subplots()
axes.plot([1, 2, 3], [3, 1, 2])
png = io.BytesIO()
figure.savefig(png, format="png")  # a plot as any backend hands it over: image/png
display(Image(data=png.getvalue(), format="png"))
"""
ACTIVE_TAGS = {"script", "iframe", "frame", "form", "input", "link", "object", "embed", "base"}


class Elements(HTMLParser):
    """Every element's tag and attributes, and the text of every `<style>`."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.styles: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        if self.lasttag == "style":
            self.styles.append(data)


def active_parts(html: str) -> list[str]:
    """What a browser would run or fetch from the page: nothing may be."""
    page = Elements(html)
    bad = []
    for tag, attrs in page.found:
        if tag in ACTIVE_TAGS or (
            tag == "meta" and attrs.keys() - {"charset", "http-equiv", "content"}
        ):
            bad.append(f"<{tag}>")
        if (
            tag == "meta"
            and attrs.get("http-equiv", "Content-Security-Policy") != "Content-Security-Policy"
        ):
            bad.append(f"<meta http-equiv={attrs['http-equiv']}>")
        bad += [f"{tag} {name}" for name in attrs if name.startswith("on")]
        href, src = attrs.get("href", ""), attrs.get("src")
        if re.match(r"\s*[a-z]+:", href, re.I) and not href.startswith(("http", "mailto:")):
            bad.append(f"{tag} href={href}")
        if src is not None and not src.startswith("data:image/"):
            bad.append(f"{tag} src={src[:40]}")
    css = " ".join(page.styles + [attrs.get("style", "") for _, attrs in page.found])
    bad += [u for u in re.findall(r"url\(\s*['\"]?([^)'\"]*)", css) if not u.startswith("data:")]
    return bad


def test_the_stored_html_keeps_plots_and_tables_and_drops_everything_active(tmp_path: Path):
    path = write_nb(tmp_path / "hostile.ipynb", params="n: int = 1", body=BODY)
    run = execute(parse_notebook(path), runs_dir=tmp_path / "runs", target=target(tmp_path))
    assert run.html is not None
    html = run.html.read_text(encoding="utf-8")
    executed = run.ipynb.read_text(encoding="utf-8")
    assert "attacker.example" in executed and "onerror" in executed  # the outputs were there
    assert active_parts(html) == []
    # Still a report: the plot inline, the table, the markdown, the highlighted code, the style.
    assert re.search(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', html)
    assert '<table border="1" class="dataframe">' in html and "<td>white</td>" in html
    assert "<strong>bold</strong>" in html and '<p style="color:red">styled</p>' in html
    assert 'class="highlight' in html and "jp-RenderedHTMLCommon" in html
    assert html.count("<style") >= 1 and "click</a>" in html
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in html
    assert inert_document(html) == html  # cleaning again (as the app does) changes nothing

    # Dagster's notebook viewer renders the `.ipynb` it is given with plain nbconvert, scripts
    # and all, on Dagster's origin: the copy it is given renders inert there too.
    viewed, _ = HTMLExporter().from_notebook_node(nbformat.read(viewer_copy(run.ipynb), 4))
    plain, _ = HTMLExporter().from_notebook_node(nbformat.read(run.ipynb, 4))
    assert "<script>" in active_parts(plain.partition("<main>")[2])
    assert active_parts(viewed.partition("<main>")[2]) == []
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', viewed)
    assert "<td>white</td>" in viewed and "<strong>bold</strong>" in viewed


def test_a_page_written_before_cleaning_is_made_inert_too():
    legacy = (
        '<!DOCTYPE html><html><head><script src="https://cdn.example/require.js"></script>'
        "<style>.x { color: blue }</style></head><body><main>"
        f"{HOSTILE}<p>kept</p></main><script>window.parent.x = 1</script></body></html>"
    )
    html = inert_document(legacy)
    assert active_parts(legacy) and active_parts(html) == []
    assert "attacker.example" not in html and "window.parent" not in html
    assert "<style>.x { color: blue }</style>" in html and "<p>kept</p>" in html
