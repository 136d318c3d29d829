"""How a metric is shown to people. Runs store fractions (metrics.csv, eval.csv: 0.8378, as programs
expect); every table, figure and line for people shows a metric a task marks "%" in percent (83.78),
differences of percentages in points, errors in the target's units, and names the unit."""

from __future__ import annotations

import math

PERCENT = "%"


def scale(unit: str) -> float:
    """What a stored value is multiplied by to be shown in ``unit``."""
    return 100.0 if unit == PERCENT else 1.0


def shown(value, unit: str) -> str:
    """The number alone: 83.78 for a fraction shown in percent, 4 significant digits otherwise, – for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * 100:.2f}" if unit == PERCENT else f"{value:.4g}"


def with_unit(value, unit: str) -> str:
    """83.78%, 4.21 target units, 0.912."""
    text = shown(value, unit)
    return text + ("%" if unit == PERCENT else f" {unit}" if unit else "") if text != "–" else text


def labelled(name: str, unit: str) -> str:
    """A column or axis name with its unit: ``fine:accuracy [%]``, ``count:mae [target units]``, ``count:r2``."""
    return f"{name} [{unit}]" if unit else name
