"""Every relative link in README.md and docs/*.md points at a file or folder that exists."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent

# [text](target) and ![alt](target), with an optional "title"; text may hold `code`.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")
SKIP = ("http://", "https://", "mailto:")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text outside code blocks and code spans (link syntax inside code is not a link)."""
    kept, fence = [], None
    for line in text.splitlines():
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None and line.lstrip().startswith(fence):
            fence = None
        elif fence is None:
            kept.append(INLINE_CODE.sub("", line))
    return "\n".join(kept)


def relative_links(path: Path) -> list[str]:
    targets = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if target.lower().startswith(SKIP) or target.startswith("#"):
            continue
        targets.append(target)
    return targets


def test_link_pattern():
    text = 'a [x](docs/a.md#b) ![i](p.png) [`c`](c.md "T") [w](https://e.org) [t](#top) `[s](span.md)`\n'
    text += "```bash\n[f](fenced.md)\n```\nafter [y](y.md)\n"
    found = LINK.findall(prose(text))
    assert found == ["docs/a.md#b", "p.png", "c.md", "https://e.org", "#top", "y.md"]


def test_relative_links_resolve():
    broken = []
    for path in markdown_files():
        for target in relative_links(path):
            file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "broken relative links in the docs:\n  " + "\n  ".join(broken)
