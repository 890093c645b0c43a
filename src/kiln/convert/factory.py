"""Resolve ``package.module:callable`` (or ``path/to/file.py:callable``) to a Python object."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from kiln.errors import InvalidSourceError

_FACTORY = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][\w.]*)$")


def is_factory_path(source: str) -> bool:
    m = _FACTORY.match(source)
    if not m:
        return False
    module = m.group("module")
    return module.endswith(".py") or re.fullmatch(r"[A-Za-z_][\w.]*", module) is not None


def resolve(source: str) -> Any:
    """Import the module and return the attribute; errors name the part that failed."""
    m = _FACTORY.match(source)
    if not m:
        raise InvalidSourceError(source, "expected a factory path like 'package.module:callable'")
    module_name, attr = m.group("module"), m.group("attr")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise InvalidSourceError(source, f"file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"kiln_user_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise InvalidSourceError(source, f"{path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise InvalidSourceError(source, f"running {path} raised {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise InvalidSourceError(
                source, f"module {exc.name!r} was not found (is it installed or on PYTHONPATH?)"
            ) from None
        except Exception as exc:
            raise InvalidSourceError(source, f"importing {module_name} raised {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidSourceError(source, f"{module_name} has no attribute {attr!r}") from None
    return obj
