"""caitlab's sweep-aware submitit launchers, where Hydra looks for plugins.

Hydra's plugin scan executes every module of this package (its name without a leading
underscore) once more, some before they are in ``sys.modules``: their dataclasses cannot use
``from __future__ import annotations`` (``dataclasses`` looks the module up to read them),
and a class is looked up through its module when used, not kept from an import.
"""
