"""mkdocs hooks: the docstrings are written for pydoc and Sphinx alike, with roles such as
``:class:`Task``` that Markdown leaves as text; the API reference shows the name alone."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    return _ROLE.sub("", html)
