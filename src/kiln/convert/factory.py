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
            raise InvalidSourceError(source, _not_found(module_name, attr, exc)) from None
        except Exception as exc:
            raise InvalidSourceError(source, f"importing {module_name} raised {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidSourceError(source, f"{module_name} has no attribute {attr!r}") from None
    return obj


def _not_found(module_name: str, attr: str, exc: ModuleNotFoundError) -> str:
    """Why ``import module_name`` found no module, and the fix: the module itself is not on the path (though
    a file of that name may sit in this folder), or the module was found and an import inside it failed."""
    missing = exc.name or module_name
    top = module_name.split(".")[0]
    if missing != module_name and not module_name.startswith(missing + "."):
        where = module_name.replace(".", "/") + ".py"
        return (
            f"importing {module_name} failed: {where} imports {missing!r}, which is not installed; "
            f"install it (pip install {missing.split('.')[0]}) or remove that import"
        )
    local = next((p for p in (Path(f"{top}.py"), Path(top) / "__init__.py", Path(top)) if p.exists()), None)
    looked = "kiln looked for it with Python's import system (installed packages and PYTHONPATH)"
    if local is not None:
        shown = f"{top}.py" if local.suffix == ".py" and local.parent == Path() else f"{top}/"
        path_form = f"'{module_name.replace('.', '/')}.py:{attr}'"
        return (
            f"module {module_name!r} was not found: {looked}, and the current folder, where {shown} is, is not "
            f"on that path; pass the file instead ({path_form}) or run with PYTHONPATH=."
        )
    return f"module {missing!r} was not found: {looked}; install it, or add the folder that holds it to PYTHONPATH"
