"""Lazy public names for a package ``__init__``: each loads its module on first use (PEP 562)."""
import importlib
from typing import Dict


def lazy_public_names(package: str, public: Dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``, where ``public`` maps each public name to its module."""

    def __getattr__(name):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(public[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(public))

    return __getattr__, __dir__
