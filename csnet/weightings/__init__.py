"""Loss weightings, one file each, named once here: ``--weighting NAME`` or ``NAME:OPTION``."""

from __future__ import annotations

from csnet.errors import UsageError
from csnet.weightings.base import Weighting
from csnet.weightings.dwa import DWA
from csnet.weightings.equal import Equal
from csnet.weightings.fixed import Fixed
from csnet.weightings.gradnorm import GradNorm
from csnet.weightings.pcgrad import PCGrad
from csnet.weightings.uncertainty import Uncertainty

WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": Equal,
    "fixed": Fixed,
    "uncertainty": Uncertainty,
    "dwa": DWA,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
}

__all__ = ["WEIGHTINGS", "Weighting", "check_name", "make"]


def check_name(spec: str) -> type[Weighting]:
    name, _, _ = spec.partition(":")
    if name not in WEIGHTINGS:
        raise UsageError(f"unknown --weighting {name!r}; valid: {', '.join(WEIGHTINGS)} (fixed:TASK=W,..., dwa:T, "
                         "gradnorm:ALPHA)")
    return WEIGHTINGS[name]


def make(spec: str, tasks: dict, seed: int = 0) -> Weighting:
    """The weighting ``spec`` names, for ``tasks`` (name -> Task), its random draws seeded by ``seed``."""
    cls = check_name(spec)
    _, colon, option = spec.partition(":")
    return cls(tasks, option if colon else None, seed)
