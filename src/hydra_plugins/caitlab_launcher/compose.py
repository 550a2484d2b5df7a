"""Each job of a sweep as Hydra composes it, and its run folder, at a fraction of the cost.

``SweepAwareSweeper`` (conf/hydra/default.yaml) checks every job of a batch with it, and the
launchers find the jobs' run folders with the same compositions: one composition per set of
config-group choices instead of two per job.
"""

import copy
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from omegaconf import DictConfig, OmegaConf

from caitlab import compat, identity
from caitlab.record import find_folder


class _Base:
    """One composition of a sweep, shared by its jobs that choose the same config groups."""

    def __init__(self, config: DictConfig) -> None:
        self.pristine = config
        self.work: DictConfig | None = None  # ``pristine`` + the last job's value overrides
        self.applied: list[Any] | None = None  # the last job's value overrides


class SweepPlan:
    """Each job of a sweep as Hydra composes it, and its run folder, at a fraction of the cost.

    Hydra composes every job from scratch (``load_sweep_config``: 0.2-0.5 s on a laptop CPU),
    twice per job in a sweep (the sweeper validates every job, then the launcher needs its
    run folder): minutes for a sweep of hundreds of runs. But composing only interprets the
    config-group overrides (``model=vit_tiny``); Hydra applies the other, value overrides
    (``seed=3``) to the composed config afterwards, one by one, with
    ``caitlab.compat.apply_value_overrides``. So this composes once per distinct set
    of group overrides (sorted out by Hydra's own rule, ``defaults_list.Overrides``) and applies
    each job's value overrides to it with that same function: the job's config, and any error,
    are Hydra's own. Jobs that only change existing keys to plain values (a seed sweep, a grid
    over ``model.depth``...) are applied in place, one after the other, to one copy of the
    composition: each job sets the same keys, so nothing of the previous job survives; any
    other job starts from a fresh copy.

    Only the ``hydra`` node differs from a full composition (its record of the value
    overrides), so a ``hydra.sweep.dir`` that interpolates ``hydra.*`` falls back to composing
    every job in full.
    """

    def __init__(self, config_loader: Any, master: DictConfig) -> None:
        self._loader = config_loader
        self._master = master
        self._parser = OverridesParser.create()  # building a parser costs more than parsing
        # Hydra's config repository; None where the loader has none (compose every job)
        self._repo: Any = getattr(config_loader, "repository", None)
        self._bases: dict[tuple[str, ...], _Base] = {}
        self._parsed: dict[str, tuple[Any, bool]] = {}
        self._run_dirs: dict[tuple[str, ...], Path] = {}
        self._identity: identity.Identity | None = None
        sweep = OmegaConf.to_container(master.hydra.sweep, resolve=False)
        raw_dir = sweep.get("dir") if isinstance(sweep, dict) else None
        self._full = self._repo is None or "hydra" in str(raw_dir)

    def _parse(self, line: str) -> tuple[Any, bool]:
        """(the parsed override, whether composition needs it); a sweep repeats most of its
        overrides in every job, so each distinct one is parsed and classified once."""
        if line not in self._parsed:
            (o,) = self._parser.parse_overrides([line])
            self._parsed[line] = (o, identity.composes(o, self._repo.group_exists))
        return self._parsed[line]

    def _split(self, overrides: list[str]) -> tuple[tuple[str, ...], list[Any]]:
        """(the overrides composition needs, the value overrides applied afterwards)."""
        group, values = [], []
        for line in overrides:
            o, composes = self._parse(line)
            if composes:
                group.append(line)
            else:
                values.append(o)
        return tuple(group), values

    def _job(self, overrides: list[str]) -> tuple[DictConfig, _Base | None]:
        if self._full:
            return self._loader.load_sweep_config(self._master, list(overrides)), None
        group, values = self._split(overrides)
        base = self._base(group)
        changed = _changes(base.applied, values)
        if changed is None or base.work is None:
            work, changed = copy.deepcopy(base.pristine), values
        else:
            work = base.work
        base.work = base.applied = None  # until the overrides are all applied
        compat.apply_value_overrides(changed, work)
        base.work, base.applied = work, values
        return work, base

    def _base(self, group: tuple[str, ...]) -> _Base:
        if group not in self._bases:
            self._bases[group] = _Base(self._loader.load_sweep_config(self._master, list(group)))
        return self._bases[group]

    def config(self, overrides: list[str]) -> DictConfig:
        """The job's config (its non-``hydra`` part exactly Hydra's); raises what Hydra raises.
        It is a working copy, shared: read it before asking for the next job's."""
        return self._job(overrides)[0]

    def run_dir(self, overrides: list[str]) -> Path:
        """``<hydra.sweep.dir>/<signature>``: where the job will run (``caitlab.identity``),
        the signature computed from the compositions of the same group overrides."""
        key = tuple(overrides)
        if key not in self._run_dirs:
            if self._identity is None:
                self._identity = identity.Identity(
                    lambda group: self._base(group).pristine, self._repo.group_exists)
            cfg, _ = self._job(list(overrides))
            sig = identity.signature_of(self._identity.delta(cfg, overrides))
            parent = Path(str(cfg.hydra.sweep.dir))
            self._run_dirs[key] = parent / find_folder(parent, sig, cfg)
        return self._run_dirs[key]


def _changes(previous: list[Any] | None, values: list[Any]) -> list[Any] | None:
    """The overrides that turn the config of a job with value overrides ``previous`` into that
    of one with ``values``, applied to it in place; None where only a fresh copy is exact.

    In place is exact when both jobs have overrides in the same places with distinct keys, none
    a prefix of another (so their order does not matter), and each that differs sets an
    existing key to a plain value (so it replaces whatever the previous job left there)."""
    if previous is None or len(previous) != len(values):
        return None
    keys = [o.key_or_group for o in values]
    if len(set(keys)) != len(keys) or any(a.startswith(f"{b}.") for a in keys for b in keys):
        return None
    changed = []
    for old, new in zip(previous, values, strict=True):
        if old.input_line == new.input_line:
            continue
        if old.key_or_group != new.key_or_group or any(
                o.type != OverrideType.CHANGE or isinstance(o.value(), (dict, list))
                for o in (old, new)):
            return None
        changed.append(new)
    return changed
