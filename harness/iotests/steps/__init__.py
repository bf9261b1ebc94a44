"""The step vocabulary of YAML cases, one module per concern.

vocabulary holds argument types, StepDef (a step's metadata) and the
registry; planned what the plan compiler (harness.iotests.plan) makes of a
case; session the state and services steps act through; the other
modules hold step bodies (io, tools, faults, export, host).  Importing the
package imports every module in it, so a new step is one @step function in
the module of its concern (or a new module here), plus its case and golden
file; the table in docs/writing-cases.md is generated from the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from .session import Session, StepTimeout
from .vocabulary import (
    CASE_DEFAULTS,
    CASE_EXPORT_FIELDS,
    EXPORT_FIELDS,
    IMAGE_FIELDS,
    STEPS,
    FieldError,
    Fields,
    NameUse,
    StepDef,
    convert_fields,
    step,
    step_reference,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CASE_DEFAULTS",
    "CASE_EXPORT_FIELDS",
    "EXPORT_FIELDS",
    "IMAGE_FIELDS",
    "STEPS",
    "FieldError",
    "Fields",
    "NameUse",
    "Session",
    "StepDef",
    "StepTimeout",
    "convert_fields",
    "step",
    "step_reference",
]
