"""The MODEL argument of ``caitlab-bench`` and the benchmark scripts: a registered variant, a
run folder (the model it trained), a model config, or a project's own class, built with
constructor overrides on any device (``meta`` by default: counting costs nothing)."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BenchError(Exception):
    """A bad request: reported as one ``caitlab-bench: error: ...`` line, exit status 2."""


@dataclass
class ModelSource:
    """Where a MODEL argument's model comes from: caitlab's registry, a run folder's
    ``config.yaml`` (its ``model`` section), or a class/factory of a project's own."""

    label: str  # what the table shows beside MODEL: the registered name or the dotted path
    build: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)  # its arguments before --set
    data: dict[str, Any] = field(default_factory=dict)  # a run's data: its in_chans/img_size


def _import_object(path: str) -> Any:
    """``pkg.module.Name`` -> the object, importing ``pkg.module`` (a project's own package in
    the folder caitlab-bench runs in included)."""
    from caitlab.config import project_on_path  # Hydra, OmegaConf: kept off --help

    project_on_path()
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BenchError(f"cannot import {path}: {e} (run caitlab-bench in the folder that "
                         "holds it, or install it)") from None
    if not hasattr(module, attr):
        close = difflib.get_close_matches(attr, [n for n in dir(module)
                                                 if not n.startswith("_")], n=3)
        hint = f" (did you mean {', '.join(f'{module_name}.{c}' for c in close)}?)" if close else ""
        raise BenchError(f"cannot import {path}: {module_name} has no {attr!r}{hint}")
    return getattr(module, attr)


def _from_run(path: Path) -> ModelSource:
    import yaml  # kept off caitlab-bench --help

    config = path / "config.yaml" if path.is_dir() else path
    if not config.is_file():
        raise BenchError(f"{path}: no config.yaml there (a caitlab-train run folder holds one)")
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise BenchError(f"{config}: cannot read it ({e.__class__.__name__})") from None
    model: dict | None
    if isinstance(cfg, dict) and cfg.get("_target_"):  # a model config (conf/model/x.yaml)
        model, cfg = cfg, {}
    else:
        model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not model.get("_target_"):
        raise BenchError(f"{config}: no model._target_ (neither a caitlab-train run's "
                         "config.yaml nor a model config)")
    target = str(model["_target_"])
    # values taken from elsewhere in a model config (${data.in_chans}) are left to the
    # constructor's defaults or --set; a run's config.yaml has them resolved
    kwargs = {k: v for k, v in model.items() if not str(k).startswith("_")
              and not (isinstance(v, str) and "${" in v)}
    data = cfg.get("data")
    data = data if isinstance(data, dict) else {}
    label = str(kwargs["name"]) if target == "caitlab.models.create_model" else target
    return ModelSource(label, _import_object(target), kwargs, data)


def resolve_model(spec: str) -> ModelSource:
    """MODEL: a registered variant (``cait_tiny``), a run folder or its ``config.yaml``
    (``outputs/demo/8aac04fac3``: the model it trained, as configured), a model config
    (``conf/model/mynet.yaml``), or the dotted path of a model class or factory of a
    project's own (``mynet.MyNet``, arguments by --set)."""
    from caitlab.models import create_model, list_models  # torch: kept off caitlab-bench --help

    if spec in list_models():
        return ModelSource(spec, lambda **kw: create_model(spec, **kw))
    path = Path(spec)
    if path.exists() or "/" in spec or spec.endswith((".yaml", ".yml")):
        if not path.exists():
            raise BenchError(f"{spec}: no such run folder or file")
        return _from_run(path)
    if "." in spec and all(part.isidentifier() for part in spec.split(".")):
        return ModelSource(spec, _import_object(spec))
    close = difflib.get_close_matches(spec, list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BenchError(f"unknown model name {spec!r}{hint}; give a registered variant "
                     f"({', '.join(list_models())}), a run folder, or module.Class of your own")


def _construct(source: ModelSource, kwargs: dict[str, Any], device: Any) -> Any:
    import torch  # heavy: kept off caitlab-bench --help

    from caitlab.models import (  # torch: kept off caitlab-bench --help
        ModelConfigError,
        UnknownModelError,
    )

    try:
        try:
            with torch.device(device):
                return source.build(**kwargs)
        except (NotImplementedError, RuntimeError):
            if str(device) != "meta":
                raise
            # a project's model that does real work on its tensors at construction: it is
            # only counted, so the CPU does as well as meta (for a small model)
            return source.build(**kwargs)
    except (UnknownModelError, ModelConfigError) as e:
        raise BenchError(str(e)) from None
    except (TypeError, ValueError) as e:  # an unknown keyword, or a value it refuses
        msg = re.sub(r"^[\w.]*__init__\(\) ", "", str(e))
        raise BenchError(f"bad model arguments {kwargs}: {msg}") from None


def _input_shape(model: Any, source: ModelSource, kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of one input: a caitlab model's ``config``, else the
    ``in_chans``/``img_size`` it was built with (--set, the run's config, the run's data, the
    constructor's defaults)."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and "in_chans" in cfg and "img_size" in cfg:
        h, w = cfg["img_size"]  # (height, width)
        return int(cfg["in_chans"]), int(h), int(w)
    try:
        defaults = {k: p.default for k, p in inspect.signature(source.build).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):
        defaults = {}

    def pick(key: str) -> Any:
        for where in (kwargs, source.data, defaults):
            if where.get(key) is not None:
                return where[key]
        return None

    chans, size = pick("in_chans"), pick("img_size")
    if chans is None or size is None:
        raise BenchError(f"{source.label}: cannot tell the size of its input images: give "
                         "--set in_chans=C --set img_size=N, or bench a run folder of it")
    h, w = (size, size) if isinstance(size, int) else size
    return int(chans), int(h), int(w)


def build(name: str, overrides: dict[str, Any] | None = None, img_size: int | None = None,
          device: Any = "meta") -> tuple[Any, ModelSource, tuple[int, int, int]]:
    """(model, where it came from, its input's (C, H, W)) for MODEL ``name``: see
    :func:`resolve_model` and :func:`build_model`."""
    source = resolve_model(name)
    kwargs = {**source.kwargs, **(overrides or {})}
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = _construct(source, kwargs, device)
    return model, source, _input_shape(model, source, kwargs)


def build_model(name: str, overrides: dict[str, Any] | None = None,
                img_size: int | None = None, device: Any = "meta") -> Any:
    """Builds MODEL ``name`` (:func:`resolve_model`) with ``overrides`` (``img_size`` wins over
    an override) on ``device``.

    Raises :class:`BenchError` for an unknown name or an impossible combination of arguments.
    """
    return build(name, overrides, img_size, device)[0]
