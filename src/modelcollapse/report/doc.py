"""The page: index.html and summary.md written side by side from one sequence of headings, paragraphs, lists,
figures and tables, the text escaped for HTML and sampled text made printable."""

from __future__ import annotations

import html
import unicodedata
from pathlib import Path


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}.row{display:flex;flex-wrap:wrap}"
         "figure{margin:4px}figcaption,.caption{font-size:13px;color:#444}pre{white-space:pre-wrap;font-size:12px}"
         ".claim{background:#eef4fb;padding:6px}.reference{background:#f6f6f6;padding:6px}")


class Doc:
    """The report's HTML body and summary.md, written side by side so that both carry the same words.
    A piece of text is a str, or a (text, href) pair for a link."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []

    @staticmethod
    def _inline(parts) -> tuple[str, str]:
        h, m = [], []
        for part in parts:
            if isinstance(part, tuple):
                text, href = part
                h.append(f"<a href='{html.escape(href)}'>{html.escape(text, quote=False)}</a>")
                m.append(f"[{text}]({href})")
            else:
                h.append(html.escape(part, quote=False))  # text, not an attribute: quotes stay readable
                m.append(part)
        return "".join(h), "".join(m)

    def heading(self, level: int, *parts) -> None:
        h, m = self._inline(parts)
        self.html.append(f"<h{level}>{h}</h{level}>")
        self.md += ["#" * level + " " + m, ""]

    def para(self, *parts, cls: str | None = None, lead: str = "") -> None:
        h, m = self._inline(parts)
        attr = f" class='{cls}'" if cls else ""
        self.html.append(f"<p{attr}>{f'<b>{html.escape(lead, quote=False)}</b> ' if lead else ''}{h}</p>")
        self.md += [(f"**{lead}** " if lead else "") + m, ""]

    def items(self, rows: list[list]) -> None:
        """A bulleted list, each row a list of parts."""
        if rows:
            pairs = [self._inline(r) for r in rows]
            self.html.append("<ul>" + "".join(f"<li>{h}</li>" for h, _ in pairs) + "</ul>")
            self.md += [f"- {m}" for _, m in pairs] + [""]

    def figure(self, png: str, alt: str, caption: str) -> None:
        self.html.append(f"<figure><a href='{html.escape(png)}'><img src='{html.escape(png)}' alt='{html.escape(alt)}' "
                         f"style='max-width:100%'></a><figcaption>{html.escape(caption, quote=False)}</figcaption></figure>")
        self.md += [f"![{alt}]({png})", "", f"*{caption}*", ""]

    def table(self, caption: str, header: list[str], body: list[list[str]]) -> None:
        self.html.append(f"<p class='caption'>{html.escape(caption, quote=False)}</p>{html_table(header, body)}")
        self.md += [f"**{caption}**", "", markdown(header, body), ""]

    def write(self, out: Path) -> None:
        """summary.md and index.html into `out`."""
        (out / "summary.md").write_text("\n".join(self.md) + "\n", errors="backslashreplace")  # paths need not be UTF-8
        (out / "index.html").write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>modelcollapse report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(self.html)}</body></html>\n", errors="backslashreplace"
        )


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def printable(text: str) -> str:
    """Sampled text as valid text for a page: a control character (NUL, 0x03, DEL, C1, ...) becomes a visible
    `\\xNN` escape; tabs and newlines stay. U+FFFD, where the model's bytes were not UTF-8, stays as it is."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs") else
                   f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)
