"""The pages' templates (``genflow/outputs/report/templates``) and the filters that keep untrusted text inert."""

from __future__ import annotations

import math
import re
from typing import Any

import jinja2
from markupsafe import Markup, escape

MAX_TEXT_CHARS = 4000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def visible(text: Any, limit: int = MAX_TEXT_CHARS) -> Markup:
    """Untrusted text, escaped, with control characters shown as ``\\xNN`` and long text cut."""
    if text is None:
        return Markup("")
    s = str(text)
    extra = len(s) - limit
    if extra > 0:
        s = s[:limit]
    out, last = [], 0
    for m in _CONTROL.finditer(s):
        out.append(escape(s[last:m.start()]))
        out.append(Markup('<span class="ctl">%s</span>') % f"\\x{ord(m.group()):02x}")
        last = m.end()
    out.append(escape(s[last:]))
    if extra > 0:
        out.append(Markup('<span class="muted">\n… (%s more characters)</span>') % f"{extra:,}")
    return Markup("").join(out)


def fmt(value: Any, digits: int = 3) -> str:
    """A figure as the page shows it: thousands separated, ``digits`` decimals, – for none."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}"
    return str(value)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("genflow.outputs.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["visible"] = visible
    env.filters["fmt"] = fmt
    return env
