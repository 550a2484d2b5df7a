"""Run identity: the signature that names a run's folder, from what was asked.

Dora's rule (``dora/xp.py``, ``dora/hydra.py``): a run is identified by what makes it differ
from the defaults, not by everything its config happens to hold. The signature hashes

- the config-group choices that differ from those of the default composition
  (``model=vit_tiny``, and the nested choices it brings: ``model/residual=none``...), and
- the values that differ from the composition of those same choices (``seed=3``,
  ``model.depth=8``, and whatever they change through interpolation: ``data.seed``),

minus the keys ``signature_exclude`` (train.yaml) declares, as glob patterns over dotted keys
(loggers, paths, display...). So a key added with its default value, to caitlab's config or
to a user's, never changes a signature; neither does editing the contents of an option file
(a run's provenance says which code and config produced it).

Folders named by the previous rule (a hash of the whole resolved config) are found by what
they hold, not by that rule: ``caitlab.record.find_folder`` compares their recorded config
with the one asked for (:func:`first_difference`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, cast

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from caitlab import compat
from caitlab.config import container
from caitlab.errors import UserError

SIGNATURE_LENGTH = 10
DELETED = "<deleted>"  # a value (``~ema``) or a config group (``~recipe``) the run removed
# For configs composed without train.yaml's list (a user's own primary config)
DEFAULT_EXCLUDE = ("hydra.*", "logger.*", "paths.*", "cluster.*", "local.*", "name", "tags",
                   "retry_failed", "signature_exclude")
# Where things are, not what they are: a group the signature leaves out (paths, local) may
# move them without making another run. What lies there is checked where a folder is reused
# (caitlab.training.reuse), not named.
LOCATION_KEYS = ("data.root",)
# Lists the model reads as sets (it sorts them): [2, 1] and [1, 2] are one run
UNORDERED_KEYS = ("model.reorg_layers",)
# Callbacks (by ``_target_``) that change no result, for configs without train.yaml's
# ``signature_exclude_callbacks``: any other callback (early stopping, SWA...) counts
DISPLAY_CALLBACKS = tuple(
    f"lightning.pytorch.callbacks.{name}" for name in (
        "RichProgressBar", "TQDMProgressBar", "RichModelSummary", "ModelSummary",
        "LearningRateMonitor", "DeviceStatsMonitor"))
# Groups whose choice the signature leaves out: an option chosen in them counts by the
# values it sets outside the excluded keys (``local=bigbatch`` setting data.batch_size)
VALUE_ONLY_GROUPS = ("local", "paths", "logger")


def exclusions(cfg: DictConfig | dict) -> tuple[str, ...]:
    patterns = cfg.get("signature_exclude") if hasattr(cfg, "get") else None
    return tuple(patterns) if patterns else DEFAULT_EXCLUDE


def excluded(key: str, patterns: Iterable[str]) -> bool:
    """``key`` (dotted) matches a pattern, or lies under one (``logger`` under ``logger.*``)."""
    return any(fnmatchcase(key, p) or fnmatchcase(f"{key}.", p) for p in patterns)


def values(cfg: DictConfig, patterns: Iterable[str]) -> dict[str, Any]:
    """Every leaf the signature may see: dotted key -> resolved value (lists whole)."""
    patterns = tuple(patterns)
    out: dict[str, Any] = {}
    for key in cfg:
        key = str(key)
        if excluded(key, patterns):
            continue
        if OmegaConf.is_missing(cfg, key):
            out[key] = "???"
            continue
        value = resolved(cfg, key)
        if key == "callbacks" and isinstance(value, dict):
            value = without_display_callbacks(value, cfg)
        flatten(value, key, out, patterns)
    return out


def without_display_callbacks(callbacks: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """``callbacks`` less those ``signature_exclude_callbacks`` names: they change no
    result."""
    names = cfg.get("signature_exclude_callbacks") if hasattr(cfg, "get") else None
    display = set(DISPLAY_CALLBACKS if names is None else names)
    return {k: v for k, v in callbacks.items()
            if not (isinstance(v, dict) and v.get("_target_") in display)}


def resolved(cfg: DictConfig, key: str) -> Any:
    """``cfg[key]`` as plain data, resolved where it is: it may interpolate keys left out
    (``data.root`` -> ``paths.data_dir``)."""
    node = compat.config_node(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else cfg[key]


def flatten(value: Any, key: str, out: dict[str, Any], patterns: tuple[str, ...]) -> None:
    if excluded(key, patterns):
        return
    if isinstance(value, dict) and value:
        for k, v in value.items():
            flatten(v, f"{key}.{k}", out, patterns)
    else:
        out[key] = value


def same(a: Any, b: Any) -> bool:
    # json, not ==: True == 1 in Python, but not as a config value
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True,
                                                                    default=str)


def normal(key: str, value: Any, base: Any) -> Any:
    """``value`` as the default writes it, where it means the same: a number in the type of
    the default's (``mlp_ratio=2`` is 4.0's 2.0), an unordered list sorted."""
    if key in UNORDERED_KEYS and isinstance(value, list):
        return sorted(value, key=str)
    if isinstance(value, bool) or isinstance(base, bool):
        return value
    if isinstance(base, float) and isinstance(value, int):
        return float(value)
    if isinstance(base, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def value_delta(run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    run = {k: normal(k, v, base.get(k)) for k, v in run.items()}
    delta = {k: v for k, v in run.items()
             if k not in base or not same(normal(k, base[k], base[k]), v)}
    delta.update({k: DELETED for k in base if k not in run})
    return dict(sorted(delta.items()))


def choice_delta(run: dict[str, Any], default: dict[str, Any],
                 patterns: Iterable[str]) -> dict[str, Any]:
    """Choices that differ from the default ones; a group a run lacks counts as unchosen
    (None), so a group a later version adds with a null default changes nothing."""
    patterns = tuple(patterns)
    return {g: c for g, c in sorted(run.items())
            if not excluded(g.replace("/", "."), patterns) and default.get(g) != c}


def _hash(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:SIGNATURE_LENGTH]


def signature_of(delta: dict[str, Any]) -> str:
    """``delta``: ``{"choices": ..., "values": ...}`` as :meth:`Identity.delta` gives it."""
    return _hash(delta)


def variant_of(delta: dict[str, Any]) -> str:
    """The signature without the seed: runs that differ only by seed are one variant."""
    kept = {k: v for k, v in delta["values"].items() if k != "seed" and not k.endswith(".seed")}
    return _hash({"choices": delta["choices"], "values": kept})


def describe(delta: dict[str, Any]) -> str:
    """One line: what makes a run differ from the defaults."""
    parts = [f"{g}={c}" for g, c in delta.get("choices", {}).items()]
    parts += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
              for k, v in delta.get("values", {}).items()]
    return " ".join(parts) or "(the defaults)"


def composes(override: Any, group_exists: Callable[[str], bool]) -> bool:
    """Hydra's own rule for what composition interprets: a config-group override whose value
    is not a dict; hydra.*, ``key@package=`` and sweep overrides stay with it too. The other,
    value overrides are applied to the composed config afterwards."""
    return ((group_exists(override.key_or_group) and not isinstance(override.value(), dict))
            or override.is_hydra_override() or override.package is not None
            or override.is_sweep_override())


class Identity:
    """Signatures of the configs one Hydra config loader composes.

    ``compose(group_overrides)`` gives the composition of a set of group overrides; each is
    composed (and resolved) once. ``split(overrides)`` sorts a job's overrides into the ones
    composition interprets and the others.
    """

    def __init__(self, compose: Callable[[tuple[str, ...]], DictConfig],
                 group_exists: Callable[[str], bool]) -> None:
        self._compose = compose
        self._repository_has = group_exists
        # groups a composed config chose from: a project's own (./conf/local/) are missing
        # from the loader's repository, which lacks the primary config's searchpath
        self._groups: set[str] = set()
        self._parser = OverridesParser.create()
        self._parsed: dict[str, bool] = {}
        self._bases: dict[tuple[str, ...], tuple[dict[str, Any], dict[str, Any]]] = {}

    @classmethod
    def for_loader(cls, loader: Any, config_name: str, run_mode: Any) -> Identity:
        return cls(lambda groups: loader.load_configuration(config_name, list(groups),
                                                            run_mode=run_mode),
                   loader.repository.group_exists)

    def _group_exists(self, group: str) -> bool:
        return group in self._groups or self._repository_has(group)

    def learn_groups(self, choices: Iterable[str]) -> None:
        new = set(choices) - self._groups
        if new:
            self._groups |= new
            self._parsed.clear()  # a line read as a value override may be a group's

    def composing(self, line: str) -> bool:
        if line not in self._parsed:
            (o,) = self._parser.parse_overrides([line])
            self._parsed[line] = composes(o, self._group_exists)
        return self._parsed[line]

    def split(self, overrides: Iterable[str]) -> tuple[str, ...]:
        return tuple(o for o in overrides if self.composing(o))

    def _base(self, groups: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(resolved values, choices) of the composition of ``groups``."""
        if groups not in self._bases:
            cfg = self._compose(groups)
            self._bases[groups] = (values(cfg, exclusions(cfg)),
                                   container(cfg.hydra.runtime.choices, resolve=False))
        return self._bases[groups]

    def _parse(self, line: str) -> Any:
        (o,) = self._parser.parse_overrides([line])
        return o

    def deleted(self, overrides: Iterable[str]) -> list[str]:
        """The config groups ``overrides`` delete (``~recipe``, ``~model/residual``)."""
        found = []
        for line in overrides:
            if line.startswith("~") and self.composing(line):
                o = self._parse(line)
                if o.is_delete() and self._group_exists(o.key_or_group):
                    found.append(o.key_or_group)
        return found

    def delta(self, cfg: DictConfig, overrides: Iterable[str],
              choices: Any = None) -> dict[str, Any]:
        """What makes ``cfg`` (composed from ``overrides``, with ``choices``: by default its
        ``hydra.runtime.choices``) differ from the defaults.

        Raises:
            UserError: the ``local`` option in effect sets a key that changes the result.
        """
        overrides = list(overrides)
        if choices is None:
            choices = cfg.hydra.runtime.choices
        choices = OmegaConf.to_container(choices) if OmegaConf.is_config(choices) \
            else dict(choices)
        self.learn_groups(choices)
        groups = self.split(overrides)
        patterns = exclusions(cfg)
        base_values, _ = self._base(groups)
        # the defaults are those of the same hydra.* overrides (a searchpath finds options)
        _, default_choices = self._base(tuple(g for g in groups if g.startswith("hydra")))
        chosen = choice_delta(choices, default_choices, patterns)
        chosen.update({g: DELETED for g in self.deleted(overrides)
                       if not excluded(g.replace("/", "."), patterns)})
        run_values = values(cfg, patterns)
        delta = value_delta(run_values, base_values)
        kept = tuple(g for g in groups if self._parse(g).key_or_group not in VALUE_ONLY_GROUPS)
        if kept != groups:  # what the options chosen in groups left out of it set count
            plain, _ = self._base(kept)
            moved = {k for k in LOCATION_KEYS if k not in delta}  # where, not what
            delta = {k: v for k, v in value_delta(run_values, plain).items()
                     if k not in moved}
        if not any(self._parse(g).key_or_group == "local" for g in groups):
            local = option_file(cfg, "local", choices.get("local"))
            if local is not None:
                self._check_local(kept, local)
        return {"choices": dict(sorted(chosen.items())), "values": dict(sorted(delta.items()))}

    def _check_local(self, groups: tuple[str, ...], path: Path) -> None:
        """The ``local`` option composed by default (a git-ignored ``conf/local/default.yaml``)
        differs between machines, so it must not set what a run's result depends on."""
        with_local, _ = self._base(groups)
        without, _ = self._base((*groups, "~local"))
        changed = _set_by(with_local, without)
        if changed:
            key, value = next(iter(changed.items()))
            try:
                shown = path.resolve().relative_to(Path.cwd())
            except ValueError:
                shown = path
            raise UserError(
                f"{shown} sets {key}={json.dumps(value, default=str)}: the local option in "
                "effect by default may set only what changes no result (cluster.*, paths.*, "
                "...: signature_exclude); set it on the command line or in an experiment")


def option_file(cfg: DictConfig, group: str, option: str | None) -> Path | None:
    """The file of ``group``'s ``option`` among the job's config folders, if one holds it."""
    hydra = hydra_node(cfg)
    if option is None or hydra is None:
        return None
    for source in hydra.runtime.get("config_sources") or ():
        if source.get("schema") == "file" and source.get("path"):
            path = Path(source["path"]) / group / f"{option}.yaml"
            if path.is_file():
                return path
    return None


def _set_by(with_option: dict[str, Any], without: dict[str, Any]) -> dict[str, Any]:
    """The values an option sets: where the compositions ``with_option`` and ``without`` it
    differ, locations aside."""
    return {k: v for k, v in value_delta(with_option, without).items()
            if k not in LOCATION_KEYS}


_identities: dict[int, Identity] = {}


def current(cfg: DictConfig) -> Identity | None:
    """The identity of the running Hydra app's config loader (None outside a Hydra app)."""
    if not GlobalHydra.instance().is_initialized():
        return None
    loader = GlobalHydra.instance().config_loader()
    if id(loader) not in _identities:
        hydra = hydra_node(cfg)
        name = (hydra.job.config_name if hydra is not None else None) or "train"
        _identities[id(loader)] = Identity.for_loader(loader, name, RunMode.RUN)
    return _identities[id(loader)]


def hydra_node(cfg: DictConfig) -> DictConfig | None:
    """The job's ``hydra`` node: in its config while Hydra resolves the run folder, only in
    ``HydraConfig`` once the task runs (Hydra hands the task its config without it)."""
    if "hydra" in cfg:
        return cfg.hydra
    # Hydra types its node as the HydraConf dataclass; it is the DictConfig of one
    return cast(DictConfig, HydraConfig.get()) if HydraConfig.initialized() else None


def run_delta(cfg: DictConfig) -> dict[str, Any] | None:
    """What makes the config of the running Hydra job differ from the defaults; None for a
    config composed by hand, outside an app."""
    hydra = hydra_node(cfg)
    if hydra is None or (ident := current(cfg)) is None:
        return None
    overrides = [*(hydra.overrides.hydra or []), *(hydra.overrides.task or [])]
    return ident.delta(cfg, overrides, hydra.runtime.choices)


def signature(cfg: DictConfig) -> str:
    """The signature of a config composed by Hydra (the running app's, or ``compose`` with
    ``return_hydra_config=True``): the name of its run's folder.

    Raises:
        ValueError: a config composed without Hydra's node, outside an app: what it was
            asked with (overrides, group choices) is not known.
    """
    return signature_of(_delta_or_raise(cfg))


def variant_signature(cfg: DictConfig) -> str:
    """The signature without the seed: runs that differ only by seed are one variant."""
    return variant_of(_delta_or_raise(cfg))


def _delta_or_raise(cfg: DictConfig) -> dict[str, Any]:
    delta = run_delta(cfg)
    if delta is None:
        raise ValueError("a signature needs the config as Hydra composed it (its hydra node, "
                         "or a running app): the overrides and group choices it names")
    return delta


# A checkpoint a run starts from is named by the run that wrote it (<signature>/checkpoints/
# best.ckpt), not by where its outputs folder lies now
_WEIGHTS_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors", ".bin")


def _comparable(value: Any) -> Any:
    if isinstance(value, str) and value.endswith(_WEIGHTS_SUFFIXES) and "/" in value:
        return "/".join(value.split("/")[-3:])
    return value


# Keys caitlab's config gained after runs were written, with the value those runs had
# implicitly: a run without the key differs from a request that sets another value
IMPLICIT_BEFORE = {"data.remode": "const"}


def first_difference(recorded: Mapping[Any, Any], requested: dict[str, Any],
                     patterns: Iterable[str]) -> tuple[str, Any, Any] | None:
    """The first key (sorted) whose value a run folder's recorded config and a requested one
    disagree on, as ``(key, recorded value, requested value)``; None when they agree.

    ``recorded`` and ``requested``: resolved configs as plain data. Keys ``patterns`` leave out
    (display, logging, places) and the data's location are not compared, nor keys only the
    request has (added since with their defaults, they change nothing; those whose earlier
    value :data:`IMPLICIT_BEFORE` knows are compared with it); a key only the
    recorded run has was deleted (``~ema``), and is a difference (requested value
    :data:`caitlab.DELETED`)."""
    patterns = tuple(patterns)
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for config, flat in ((recorded, old), (requested, new)):
        for key, value in config.items():
            if key == "callbacks" and isinstance(value, dict):
                value = without_display_callbacks(value, requested)
            if not excluded(str(key), patterns):
                flatten(value, str(key), flat, patterns)
    for key, value in IMPLICIT_BEFORE.items():
        if key in new and key not in old:
            old[key] = value
    for key in sorted(old):
        if key in LOCATION_KEYS:
            continue
        if key not in new:
            return key, old[key], DELETED
        a, b = _comparable(old[key]), _comparable(normal(key, new[key], old[key]))
        if not same(normal(key, a, a), b):
            return key, old[key], new[key]
    return None
