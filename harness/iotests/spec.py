"""The case model: loading and validating cases/*.yaml and cases/*.py.

A spec is checked completely before anything runs: unknown keys, bad
types, unknown steps and matrix values that nothing uses are errors that
name the file and line.  Every matrix instance is expanded and compiled
into its Plan (harness.iotests.plan) at load time, so no instance runs
half-understood and nothing reads the raw YAML afterwards.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from . import targets
from .context import Instance
from .plan import Plan, PlanError, RawStep, compile_plan

TRANSPORTS = ("legacy", "uring")
MODES = ("file", "fuse")
REQUIREMENTS: dict[str, type] = {
    "root": bool,
    "dev-fuse": bool,
    "uring": bool,
    "kernel-uring": bool,
    "fio": bool,
    "qsd": bool,
    "qemu-io": bool,
    "qemu-img": bool,
    "cpus": int,
    "cpu-last": bool,  # a step names CPU `last` (steps/host.py)
    "cpu-spare": bool,
    "hotplug": bool,  # a step takes CPUs offline or online
}
_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_REF = re.compile(r"\$\{?([A-Za-z][A-Za-z0-9_-]*)\}?")
# Matrix values end up in instance ids, directory and golden file names.
_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
RUNTIME_REFS = {"TARGET", "TEST_DIR", "IMAGE"}


class SpecError(Exception):
    """A bad spec; str() is the one-line message 'FILE:LINE: what'."""


# -- YAML with line numbers -----------------------------------------------


class LineDict(dict[str, Any]):
    line = 0
    key_lines: dict[str, int]


class LineList(list[Any]):
    line = 0


class _Loader(yaml.SafeLoader):
    pass


def _map(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    d = LineDict()
    d.line = node.start_mark.line + 1
    d.key_lines = {}
    for knode, vnode in node.value:
        key = loader.construct_object(knode, deep=True)
        if key in d:
            raise SpecError(f"{knode.start_mark.line + 1}: duplicate key '{key}'")
        d[key] = loader.construct_object(vnode, deep=True)
        d.key_lines[str(key)] = knode.start_mark.line + 1
    return d


def _seq(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    seq = LineList(loader.construct_object(n, deep=True) for n in node.value)
    seq.line = node.start_mark.line + 1
    return seq


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _seq)
# `off`/`on` stay strings (YAML 1.2 style); booleans are true/false.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))


def line_of(obj: Any, key: str | None = None, default: int = 1) -> int:
    """The line of a key or node; Python cases have none, so line 1."""
    if key is not None and isinstance(obj, LineDict):
        return obj.key_lines.get(key, obj.line)
    return getattr(obj, "line", default) or default


# -- the model ------------------------------------------------------------


@dataclass
class CaseSpec:
    id: str
    path: Path
    description: str
    guards: str
    groups: list[str]
    requires: dict[str, Any] = field(default_factory=dict)
    transports: list[str] = field(default_factory=lambda: list(TRANSPORTS))
    modes: list[str] = field(default_factory=lambda: ["fuse"])
    matrix: dict[str, list[Any]] = field(default_factory=dict)
    # Explicit combinations (a matrix given as a list of mappings), else None.
    combos: list[tuple[Any, ...]] | None = None
    image: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    timeout: float = 30.0
    serial: bool = False
    golden: str = "shared"  # or "per-transport"
    targets: list[str] = field(default_factory=list)  # only these targets; [] = any
    steps: list[RawStep] = field(default_factory=list)  # as written, for references
    module: ModuleType | None = None  # Python cases
    plans: dict[Instance, Plan] = field(default_factory=dict)  # compiled at load time

    @property
    def python(self) -> bool:
        return self.module is not None

    def plan(self, inst: Instance) -> Plan:
        """The compiled plan of an instance (on any target)."""
        return self.plans[inst.on("")]

    def step_names(self) -> set[str]:
        """Every step any instance uses, including those inside cycles."""
        return {s.name for plan in self.plans.values() for s in plan.all_steps()}

    def instances(self) -> list[Instance]:
        names = list(self.matrix)
        combos = self.combos or list(itertools.product(*(self.matrix[n] for n in names))) or [()]
        out = []
        for mode in self.modes:
            transports = self.transports if mode == "fuse" else [None]
            for t in transports:
                for combo in combos:
                    out.append(Instance(self.id, mode, t, tuple(zip(names, combo, strict=True))))
        return out

    def run_function(self) -> Callable[..., None]:
        assert self.module is not None
        fn: Callable[..., None] = self.module.run
        return fn


def substitute(value: Any, params: dict[str, Any]) -> Any:
    """Replace $name / ${name} with matrix values, recursively."""
    if isinstance(value, str):
        m = _REF.fullmatch(value)
        if m and m.group(1) in params:
            return params[m.group(1)]
        return _REF.sub(lambda m: str(params.get(m.group(1), m.group(0))), value)
    if isinstance(value, dict):
        out = LineDict({k: substitute(v, params) for k, v in value.items()})
        out.line, out.key_lines = line_of(value), getattr(value, "key_lines", {})
        return out
    if isinstance(value, list):
        seq = LineList(substitute(v, params) for v in value)
        seq.line = line_of(value)
        return seq
    return value


def references(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_REF.findall(value))
    if isinstance(value, dict):
        return set().union(*(references(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(references(v) for v in value))
    return set()


# -- validation -----------------------------------------------------------

TOP_KEYS = {
    "id",
    "description",
    "groups",
    "requires",
    "transports",
    "modes",
    "matrix",
    "image",
    "export",
    "timeout",
    "serial",
    "golden",
    "targets",
    "steps",
}


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, line: int, msg: str) -> SpecError:
        return SpecError(f"{self.path}:{line}: {msg}")

    def typed(self, value: Any, kind: type, line: int, what: str) -> Any:
        if kind is bool and not isinstance(value, bool):
            raise self.fail(line, f"{what} must be true or false, not {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(line, f"{what} must be an integer, not {value!r}")
        if kind is str and not isinstance(value, str | int):
            raise self.fail(line, f"{what} must be a string, not {value!r}")
        if kind is float and not isinstance(value, int | float):
            raise self.fail(line, f"{what} must be a number, not {value!r}")
        return str(value) if kind is str else value

    def str_list(self, value: Any, line: int, what: str, choices: tuple[str, ...] = ()) -> list:
        if not isinstance(value, list) or not value:
            raise self.fail(line, f"{what} must be a non-empty list")
        for v in value:
            if not isinstance(v, str):
                raise self.fail(line, f"{what}: {v!r} is not a string")
            if choices and v not in choices:
                raise self.fail(line, f"{what}: unknown value '{v}' (one of {', '.join(choices)})")
        return list(value)


def _guards_comment(text: str) -> str | None:
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("# Guards:"):
            return line[len("# Guards:") :].strip()
    return None


def build_spec(path: Path, data: Any, guards: str | None, python: bool) -> CaseSpec:

    c = _Checker(path)
    if not isinstance(data, dict):
        raise c.fail(1, "a case must be a mapping")
    for key in data:
        if key not in TOP_KEYS or (python and key == "steps"):
            raise c.fail(line_of(data, key), f"unknown key '{key}'")
    for key in ("id", "description", "groups") + (() if python else ("steps",)):
        if key not in data:
            raise c.fail(line_of(data), f"missing required key '{key}'")
    if not guards:
        raise c.fail(1, "missing the '# Guards: <regression> (<source>)' comment")
    case_id = c.typed(data["id"], str, line_of(data, "id"), "id")
    if not _ID.match(case_id) or case_id != path.stem:
        raise c.fail(line_of(data, "id"), f"id '{case_id}' must be the file name '{path.stem}'")
    if "uring" in case_id or "legacy" in case_id:
        # `pytest -k uring` must select io_uring instances only.
        raise c.fail(line_of(data, "id"), "a case id must not contain 'uring' or 'legacy'")
    spec = CaseSpec(
        id=case_id,
        path=path,
        description=c.typed(data["description"], str, line_of(data, "description"), "description"),
        guards=guards,
        groups=c.str_list(data["groups"], line_of(data, "groups"), "groups"),
    )
    req = data.get("requires", {})
    if not isinstance(req, dict):
        raise c.fail(line_of(data, "requires"), "requires must be a mapping")
    for k, v in req.items():
        if k not in REQUIREMENTS:
            raise c.fail(line_of(req, k), f"unknown requirement '{k}'")
        spec.requires[k] = c.typed(v, REQUIREMENTS[k], line_of(req, k), f"requires.{k}")
    if "transports" in data:
        ln = line_of(data, "transports")
        spec.transports = c.str_list(data["transports"], ln, "transports", TRANSPORTS)
    if "modes" in data:
        spec.modes = c.str_list(data["modes"], line_of(data, "modes"), "modes", MODES)
    if "timeout" in data:
        spec.timeout = float(c.typed(data["timeout"], float, line_of(data, "timeout"), "timeout"))
        if spec.timeout <= 0:
            raise c.fail(line_of(data, "timeout"), "timeout must be positive")
    if "serial" in data:
        spec.serial = c.typed(data["serial"], bool, line_of(data, "serial"), "serial")
    if "golden" in data:
        spec.golden = c.typed(data["golden"], str, line_of(data, "golden"), "golden")
        if spec.golden not in ("shared", "per-transport"):
            raise c.fail(line_of(data, "golden"), "golden must be 'shared' or 'per-transport'")
    if "targets" in data:
        ln = line_of(data, "targets")
        spec.targets = c.str_list(data["targets"], ln, "targets", tuple(targets.kinds()))
    spec.matrix, spec.combos = _matrix(c, data)
    image = data.get("image", {})
    export = data.get("export", {})
    for name, block in (("image", image), ("export", export)):
        if not isinstance(block, dict):
            raise c.fail(line_of(data, name), f"{name} must be a mapping")
    spec.image, spec.export = dict(image), dict(export)
    if not python:
        steps = data["steps"]
        if not isinstance(steps, list) or not steps:
            raise c.fail(line_of(data, "steps"), "steps must be a non-empty list")
        for raw in steps:
            ln = line_of(raw, default=line_of(steps))
            if isinstance(raw, str):
                name, arg = raw, None
            elif isinstance(raw, dict) and len(raw) == 1:
                name, arg = next(iter(raw.items()))
            else:
                raise c.fail(ln, "a step is one 'name: argument' mapping or a bare name")
            spec.steps.append(RawStep(str(name), arg, ln))
    # Every matrix value must reach the case, and every $ref must be known.
    used = references([image, export, data.get("steps", [])])
    for name in spec.matrix:
        if name not in used and not python:
            raise c.fail(_matrix_line(data, name), f"matrix.{name} is never used (${name})")
    for ref in sorted(used - set(spec.matrix) - RUNTIME_REFS):
        where = [line_of(data, k) for k in ("image", "export") if ref in references(data.get(k))]
        where += [s.line for s in spec.steps if ref in references(s.arg)]
        raise c.fail(where[0] if where else 1, f"unknown reference ${ref}")
    # Compile every instance now, so nothing runs half-understood.
    for inst in spec.instances():
        params = dict(inst.params)
        raw = (
            None
            if python
            else [RawStep(s.name, substitute(s.arg, params), s.line) for s in spec.steps]
        )
        try:
            spec.plans[inst] = compile_plan(
                inst,
                raw,
                substitute(image, params),
                substitute(export, params),
                spec.requires,
                spec.serial,
            )
        except PlanError as e:
            raise c.fail(e.line, str(e)) from None
    return spec


def _matrix(c: _Checker, data: Any) -> tuple[dict[str, list[Any]], list[tuple[Any, ...]] | None]:
    """A mapping of lists (every combination) or a list of mappings (just these)."""
    matrix = data.get("matrix", {})
    ln = line_of(data, "matrix")
    if isinstance(matrix, list):
        if not matrix or not all(isinstance(m, dict) and m for m in matrix):
            raise c.fail(ln, "a matrix list must hold non-empty mappings")
        names = list(matrix[0])
        for m in matrix:
            if list(m) != names:
                raise c.fail(line_of(m), f"every combination must set {', '.join(names)}")
        for m in matrix:
            for n in names:
                _check_value(c, m[n], line_of(m), n)
        combos = [tuple(m[n] for n in names) for m in matrix]
        if len(set(map(str, combos))) != len(combos):
            raise c.fail(ln, "the matrix repeats a combination")
        return {n: [m[n] for m in matrix] for n in names}, combos
    if not isinstance(matrix, dict):
        raise c.fail(ln, "matrix must be a mapping of lists or a list of mappings")
    out = {}
    for k, vals in matrix.items():
        if not isinstance(vals, list) or not vals:
            raise c.fail(line_of(matrix, k), f"matrix.{k} must be a non-empty list")
        if len(set(map(str, vals))) != len(vals):
            raise c.fail(line_of(matrix, k), f"matrix.{k} has a repeated value")
        for v in vals:
            _check_value(c, v, line_of(matrix, k), str(k))
        out[str(k)] = list(vals)
    return out, None


def _check_value(c: _Checker, v: Any, line: int, name: str) -> None:
    if isinstance(v, dict | list) or not _VALUE.match(str(v)):
        raise c.fail(line, f"matrix.{name}: {v!r} must be a plain word or number")


def _matrix_line(data: Any, name: str) -> int:
    m = data.get("matrix")
    return line_of(m, name) if isinstance(m, dict) else line_of(data, "matrix")


def load_spec(path: Path) -> CaseSpec:
    """Load one case file; raise SpecError with 'FILE:LINE: message'."""
    # A case's id is its file name, so two files with one stem share an id:
    # both are refused, each naming the other (instances are known by id).
    twins = [t for t in map(path.with_suffix, CASE_SUFFIXES) if t != path and t.exists()]
    if twins:
        raise SpecError(f"{path}:1: case id '{path.stem}' is also the id of {twins[0]}")
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror}") from None
    if path.suffix == ".py":
        module = _import_case(path)
        data = getattr(module, "SPEC", None)
        spec = build_spec(path, data, _guards_comment(text), python=True)
        if not callable(getattr(module, "run", None)):
            raise SpecError(f"{path}:1: a Python case must define run(ctx)")
        spec.module = module
        return spec
    try:
        data = yaml.load(text, Loader=_Loader)
    except SpecError as e:
        raise SpecError(f"{path}:{e}") from None
    except yaml.YAMLError as e:
        raise SpecError(_yaml_error(path, e)) from None
    return build_spec(path, data, _guards_comment(text), python=False)


# Constructs left open: the error shows where one was opened, not where
# the parser gave up (often the next line, or the end of the file).
_OPENED = ("while scanning a quoted scalar", "while parsing a flow", "while scanning a simple key")


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e)
    mark = getattr(e, "problem_mark", None)
    context = getattr(e, "context", None) or ""
    cmark = getattr(e, "context_mark", None)
    line = mark.line + 1 if mark else 1
    if cmark is not None and context.startswith(_OPENED):
        what = context.removeprefix("while scanning ").removeprefix("while parsing ")
        where = f"{path}:{cmark.line + 1}"
        return f"{where}: YAML: {what} opened here is not closed ({problem}, line {line})"
    return f"{path}:{line}: YAML: {problem}"


def _import_case(path: Path) -> ModuleType:
    name = "cases_" + path.stem.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"{path}:1: cannot import")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise SpecError(f"{path}:{e.lineno or 1}: Python: {e.msg}") from None
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
        line = frames[-1].lineno if frames else 1
        raise SpecError(f"{path}:{line}: import failed: {type(e).__name__}: {e}") from None
    return module


CASE_SUFFIXES = (".yaml", ".py")


def is_case_file(path: Path) -> bool:
    return path.suffix in CASE_SUFFIXES and path.name[0] not in "._"


def case_files(cases_dir: Path) -> list[Path]:
    return sorted(p for p in cases_dir.iterdir() if is_case_file(p))


def load_all(cases_dir: Path) -> tuple[list[CaseSpec], list[str]]:
    """Every spec that loads, and one error line per spec that does not."""
    specs, errors = [], []
    for path in case_files(cases_dir):
        try:
            specs.append(load_spec(path))
        except SpecError as e:
            errors.append(str(e))
    return specs, errors
