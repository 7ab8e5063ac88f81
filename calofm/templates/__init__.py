"""Markdown from Jinja templates: the model and dataset cards (`calofm.hub`) and the evaluation report
(`calofm.evaluate.report`). The templates are package data beside this file, so a wheel install finds them."""

from __future__ import annotations

import jinja2
import numpy as np


def num(value) -> str:
    """Numbers as a card shows them: 12,345 and 4 significant digits; a list joined; anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def positional(value: float, digits: int = 4) -> str:
    """`digits` significant digits without an exponent (2669, 0.0012), as read in a table next to a paper's."""
    return np.format_float_positional(value, precision=digits, unique=False, fractional=False, trim="-")


_env = jinja2.Environment(loader=jinja2.PackageLoader("calofm", "templates"), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
_env.filters.update(num=num, positional=positional, fmt=format)  # fmt: {{ x | fmt(".3g") }}


def render(template: str, **context) -> str:
    """Render a template; a missing value is an error, never a blank."""
    return _env.get_template(template).render(**context)
