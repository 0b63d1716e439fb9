"""Shared by the example scripts: replace a marked section of a Markdown document."""

from __future__ import annotations

from pathlib import Path


def replace_section(doc: Path, name: str, body: str, *, root: Path) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``doc``.

    Raises:
        SystemExit: the document lacks the markers.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} lacks the markers {begin} … {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{body}\n{end}{tail}", encoding="utf-8")
    print(f"updated {doc.relative_to(root)}")
