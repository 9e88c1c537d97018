"""Finding scenarios: the built-in ones, installed plug-ins, and a user's own file or module.

One way in for all of them, :func:`scenario_class`, which takes a *reference*:

* a built-in name (``covid``, ``labor``): a :class:`~lpm.scenarios.Scenario` subclass defined in a module of
  the ``lpm.scenarios`` package, found by scanning it (nothing to register);
* a plug-in name: an entry point in the group ``lpm.scenarios`` of an installed package
  (``[project.entry-points."lpm.scenarios"] flu = "mypkg.flu:FluScenario"``);
* ``path/to/file.py:ClassName`` (or ``path/to/file.py`` holding exactly one scenario class): a user's file,
  imported once per process under a module name derived from its absolute path;
* ``package.module:ClassName``: an importable module.

Every failure (no such file, a syntax or import error, no such class, not a scenario, a bad declaration)
is an :class:`~lpm.errors.InputError` naming the file, the class and what to do.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from lpm.errors import InputError
from lpm.scenarios.base import Scenario, check_declarations

__all__ = ["ENTRY_POINT_GROUP", "available_scenarios", "make_scenario", "scenario_class"]

ENTRY_POINT_GROUP = "lpm.scenarios"
_CONTRACT_MODULES = {"base", "registry"}


def builtin_scenarios() -> dict[str, type[Scenario]]:
    """name -> class of every scenario defined in the ``lpm.scenarios`` package, in module order."""
    import lpm.scenarios as package

    out: dict[str, type[Scenario]] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in _CONTRACT_MODULES:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for cls in _scenario_classes(module):
            out[cls.name] = cls
    return out


def installed_scenarios() -> dict[str, str]:
    """name -> ``module:Class`` of the plug-ins installed packages declare (entry points)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_scenarios() -> dict[str, str]:
    """name -> where it comes from (``built-in`` or the plug-in's ``module:Class``)."""
    return {**{name: "built-in" for name in builtin_scenarios()}, **installed_scenarios()}


def scenario_class(ref: str | type[Scenario]) -> type[Scenario]:
    """The scenario class a reference names (see the module docstring), its declarations checked."""
    if isinstance(ref, type):
        if not issubclass(ref, Scenario):
            raise InputError(f"{ref.__name__} is not an lpm.scenarios.Scenario subclass")
        check_declarations(ref)
        return ref
    ref = str(ref).strip()
    target, _, name = ref.rpartition(":") if ":" in ref else (ref, "", "")
    if target.endswith(".py"):
        cls = _from_module(_import_file(Path(target)), name, ref)
    elif "/" in target or "\\" in target:
        raise InputError(
            f"{target}: a scenario file is a Python file (.py)", hint="give path/to/file.py:ClassName"
        )
    elif ":" in ref:
        cls = _from_module(_import_module(target), name, ref)
    else:
        cls = _by_name(ref)
    check_declarations(cls)
    return cls


def make_scenario(
    ref: str | type[Scenario], config: Any = None, /, *, calibrated: bool = True, **overrides: Any
) -> Scenario:
    """A scenario object from a reference and its configuration (a mapping or keyword overrides);
    ``calibrated=False``: learnable parameters not set default to the literature values rather than the
    scenario's calibration."""
    return scenario_class(ref)(config, calibrated=calibrated, **overrides)


# -- helpers -------------------------------------------------------------------------------------------


def _by_name(name: str) -> type[Scenario]:
    builtin = builtin_scenarios()
    if name in builtin:
        return builtin[name]
    installed = installed_scenarios()
    if name in installed:
        module, _, cls = installed[name].partition(":")
        return _from_module(_import_module(module), cls, f"{name} ({installed[name]})")
    known = ", ".join([*builtin, *installed])
    raise InputError(
        f"unknown scenario {name!r}",
        hint=f"scenarios: {known}; or a file of your own: path/to/file.py:ClassName (lpm scenarios lists them)",
    )


def _scenario_classes(module: ModuleType) -> list[type[Scenario]]:
    """Concrete scenario classes defined in ``module`` (not imported into it)."""
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Scenario)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]


def _from_module(module: ModuleType, name: str, ref: str) -> type[Scenario]:
    where = getattr(module, "__file__", None) or module.__name__
    found = _scenario_classes(module)
    if not name:
        if len(found) != 1:
            shown = ", ".join(c.__name__ for c in found) or "none"
            raise InputError(
                f"{where}: name the scenario class ({ref}:ClassName); scenario classes there: {shown}"
            )
        return found[0]
    cls = getattr(module, name, None)
    if cls is None:
        shown = ", ".join(c.__name__ for c in found) or "none"
        raise InputError(f"{where}: no class {name!r} (scenario classes there: {shown})")
    if not (isinstance(cls, type) and issubclass(cls, Scenario)):
        raise InputError(
            f"{where}: {name!r} is not a subclass of lpm.scenarios.Scenario",
            hint="from lpm.scenarios import Scenario; class MyScenario(Scenario): ...",
        )
    return cls


def _import_file(path: Path) -> ModuleType:
    path = path.expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such scenario file")
    path = path.resolve()
    module_name = f"lpm_user_scenario_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up while it runs
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise InputError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - any error while running a user's file is reported as input
        sys.modules.pop(module_name, None)
        raise InputError(f"{path}: importing it failed: {_where_failed(exc, path)}") from None
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise InputError(
            f"no module {exc.name!r} (scenario reference {name!r})",
            hint="give path/to/file.py:ClassName for a file, or install the package that holds the module",
        ) from None
    except Exception as exc:  # noqa: BLE001 - as for files: a plug-in that fails to import is reported
        raise InputError(f"module {name!r}: importing it failed: {type(exc).__name__}: {exc}") from None


def _where_failed(exc: BaseException, path: Path) -> str:
    """``ErrorType: message (line N)`` with the last line of ``path`` in the traceback."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    at = f" (line {lines[-1]})" if lines else ""
    return f"{type(exc).__name__}: {exc}{at}"
