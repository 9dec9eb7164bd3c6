"""Large-scale, resumable bias audits: ``fastfair.audit(...)`` and ``fastfair audit`` / ``fastfair report``.

``fastfair.audit`` is both this package and the function: calling the package runs
``fastfair.audit.runner.audit``.
"""
from __future__ import annotations

import sys
import types

from .attributes import ATTRIBUTE_SETS, AttributeSet, AttributeSpecError, parse_attributes
from .prompts import PROMPT_SETS, PromptSetError, load_professions
from .runner import AuditInputError, AuditResult, audit
from .store import RunDirError, load_results
from .compare import CompareError, compare


def report(run_dir, out=None, **kwargs):
    """Write the self-contained HTML report of a run directory; returns its path."""
    from .page import write_report

    return write_report(run_dir, out=out, **kwargs)


__all__ = ["audit", "report", "compare", "CompareError", "load_results", "AuditResult", "AuditInputError", "RunDirError", "PromptSetError",
           "AttributeSpecError", "AttributeSet", "ATTRIBUTE_SETS", "PROMPT_SETS", "parse_attributes",
           "load_professions"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
