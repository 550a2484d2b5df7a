"""Multi-stage experiments: a teacher then its students, a pretrain then its fine-tunes.

An experiment names its stages under ``stages:``, in order, each a config delta written as
``hydra.sweeper.params`` are (``key: value``, ``key: a,b`` fans out), and refers to an earlier
stage's result with ``${stage:<name>}``::

    stages:
      teacher:
        model: cait_tiny
      student:
        model: vit_tiny,cait_tiny
        distillation: soft,hard
        distillation.teacher: ${stage:teacher}

The sweep (``SweepAwareSweeper``) expands the chain: every job of a stage is the sweep's own
overrides (``seed=0,1,2`` on the command line: a chain per seed) plus the stage's, plus
``stage=<name>``. A reference becomes ``stage:<name>@<upstream signature>``: a plain value
in the downstream's config, so that its signature holds its upstream's (not a path), and
a chain has one identity wherever its outputs live. The run resolves it to the upstream's run
folder beside its own (the same sweep folder) and that folder's best checkpoint
(``models.checkpoint.resolve_checkpoint``); an upstream that did not complete leaves it
``blocked``.

Locally the stages run in order. On SLURM the whole chain is submitted at once, each
downstream array with ``--dependency=afterok:<its upstream's job>``.

Stdlib only at import: the launcher and the report read it before anything heavy loads.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caitlab.record import RunBlocked, read_summary
from caitlab.status import Status

PREFIX = "stage:"
# a reference as written in an experiment file, and as the sweep writes it into a job
WRITTEN = re.compile(r"^\$\{stage:\s*([^}\s]+)\s*\}$")
RESOLVED = re.compile(r"^stage:([A-Za-z_][\w-]*)@([0-9a-f]+)$")
# the keys a reference may set: what the run reads a checkpoint from
REFERENCE_KEYS = ("finetune_from", "distillation.teacher")
# keys a stage cannot set: every stage lands in the sweep's folder, which these name
FOLDER_KEYS = ("name", "hydra", "paths", "stage", "stages")


class StageError(ValueError):
    """An experiment's ``stages`` that cannot be expanded: one line naming the key."""


def resolver(name: str) -> str:
    """``${stage:<name>}`` where the sweep did not expand it (outside ``stages``, or a config
    read whole): a value the run refuses with a line saying why (:func:`upstream`)."""
    return f"{PREFIX}{name}"


@dataclass(frozen=True)
class Reference:
    """A downstream job's use of an upstream stage's result."""

    key: str  # the config key it sets (finetune_from, distillation.teacher)
    stage: str  # the upstream stage's name
    signature: str  # the upstream's run folder name


def _key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def _value_line(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    elif value is None:
        value = "null"
    elif isinstance(value, (list, tuple)):
        value = "[" + ",".join(map(str, value)) + "]"
    return f"{key}={value}"


class Chain:
    """An experiment's stages, checked: names, order, the keys references set."""

    def __init__(self, stages: Mapping[str, Any]) -> None:
        if not isinstance(stages, Mapping) or not stages:
            raise StageError("stages: must map each stage's name to its overrides "
                             "(`teacher: {model: cait_tiny}`)")
        self.stages: dict[str, dict[str, Any]] = {}
        for name, delta in stages.items():
            name = str(name)
            if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
                raise StageError(f"stages.{name}: a stage's name is letters, digits, _ and -")
            if delta is None:
                delta = {}
            if not isinstance(delta, Mapping):
                raise StageError(f"stages.{name}: must map override keys to values "
                                 f"(`model: vit_tiny,cait_tiny`), not {delta!r}")
            for key, value in delta.items():
                self._check(name, str(key), value)
            self.stages[name] = {str(k): v for k, v in delta.items()}

    def _check(self, name: str, key: str, value: Any) -> None:
        if key.split(".")[0].split("/")[0] in FOLDER_KEYS:
            raise StageError(f"stages.{name}.{key}: a stage cannot set {key}: every stage's "
                             "runs land in the sweep's folder")
        match = WRITTEN.match(value) if isinstance(value, str) else None
        if isinstance(value, str) and match is None and "${stage:" in value:
            raise StageError(f"stages.{name}.{key}={value}: a reference is the whole value, "
                             "${stage:<name>}")
        if match is None:
            return
        if key not in REFERENCE_KEYS:
            raise StageError(f"stages.{name}.{key}: ${{stage:...}} can set "
                             f"{' or '.join(REFERENCE_KEYS)}, the checkpoints a run reads")
        upstream = match[1]
        if upstream not in self.stages:
            earlier = list(self.stages)
            close = difflib.get_close_matches(upstream, earlier, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise StageError(f"stages.{name}.{key}: ${{stage:{upstream}}} names no earlier "
                             f"stage{hint}; earlier: {', '.join(earlier) or 'none'}")

    def references(self, name: str) -> dict[str, str]:
        """{key: upstream stage} of the stage ``name``."""
        return {k: m[1] for k, v in self.stages[name].items()
                if isinstance(v, str) and (m := WRITTEN.match(v))}

    def jobs(self, common: list[list[str]], expand: Callable[[list[str]], list[list[str]]],
             folder: Callable[[list[str]], str]) -> list[tuple[str, list[list[str]]]]:
        """Each stage's jobs, in order: for each of the sweep's own jobs ``common`` (its
        overrides), the stage's overrides expanded (``expand``: Hydra's sweep expansion of
        ``key=value`` lines), references written as ``stage:<name>@<signature>`` (``folder``:
        a job's run folder name).

        A stage that refers to one that fans out (three pretrains, a model each) has a job per
        upstream run, which carries the upstream's axes (``model=...``) where it does not set
        them itself: the fine-tune of each pretrain."""
        out: list[tuple[str, list[list[str]]]] = []
        per_common: list[dict[str, list[_Job]]] = [{} for _ in common]
        for name, delta in self.stages.items():
            refs = self.references(name)
            ups = list(dict.fromkeys(refs.values()))
            batch = []
            for i, base in enumerate(common):
                combos = []
                for picks in itertools.product(*(per_common[i][u] for u in ups)):
                    chosen = dict(zip(ups, picks, strict=True))
                    lines = [_value_line(key, f"{PREFIX}{refs[key]}@"
                                              f"{folder(chosen[refs[key]].overrides)}"
                                         if key in refs else value)
                             for key, value in delta.items()]
                    own = {_key(line) for line in lines}
                    inherited: dict[str, str] = {}
                    for pick in picks:
                        for line in pick.axes:
                            if _key(line) not in own:
                                inherited.setdefault(_key(line), line)
                    combos += expand([*inherited.values(), *lines, f"stage={name}"])
                axes = _varying(combos) - set(refs) - {"stage"}
                jobs = []
                for combo in combos:
                    keys = {_key(o) for o in combo}
                    jobs.append(_Job([o for o in base if _key(o) not in keys] + combo,
                                     [o for o in combo if _key(o) in axes]))
                per_common[i][name] = jobs
                batch += [job.overrides for job in jobs]
            out.append((name, batch))
        return out


@dataclass
class _Job:
    overrides: list[str]
    axes: list[str]  # the overrides that tell it from the stage's other jobs


def _varying(combos: list[list[str]]) -> set[str]:
    """The keys whose value differs among ``combos``' overrides."""
    seen: dict[str, set[str]] = {}
    for combo in combos:
        for line in combo:
            seen.setdefault(_key(line), set()).add(line)
    return {k for k, lines in seen.items() if len(lines) > 1}


def parse(value: Any) -> tuple[str, str] | None:
    """(stage, signature) of a value the sweep wrote (``stage:teacher@1a2b3c4d5e``; as a
    job's override, Hydra's sweep writes it escaped: ``stage\\:teacher@...``)."""
    match = RESOLVED.match(value.replace("\\", "")) if isinstance(value, str) else None
    return (match[1], match[2]) if match else None


def references(overrides: Iterable[str]) -> list[Reference]:
    """The stage references among a job's overrides."""
    refs = []
    for line in overrides:
        key, _, value = line.partition("=")
        found = parse(value)
        if found is not None:
            refs.append(Reference(key.lstrip("+~"), *found))
    return refs


def blocked_reason(ref: Reference, summary: Mapping[str, Any] | None) -> str | None:
    """Why a job cannot start while its upstream is as ``summary`` says (None: it can)."""
    status = (summary or {}).get("status")
    if status == Status.COMPLETED:
        return None
    state = status or "not run"
    error = str((summary or {}).get("error") or "").strip().splitlines()
    why = f" ({error[0][:150]})" if error else ""
    return (f"blocked: its upstream stage {ref.stage} ({ref.signature}) is {state}{why}; "
            "launch the sweep again once it has completed (retry_failed=true re-runs a "
            "failed one)")


def upstream(key: str, value: Any, run_dir: Path) -> str:
    """The checkpoint a reference ``value`` of ``key`` names for the run in ``run_dir``: its
    upstream's best, beside it. Raises ``RunBlocked`` where that run has not completed."""
    found = parse(value)
    if found is None:
        raise StageError(f"{key}={value}: ${{stage:...}} is only resolved in an experiment's "
                         "stages, run as a sweep (-m, or hydra.mode=MULTIRUN)")
    stage, sig = found
    folder = Path(run_dir).parent / sig
    reason = blocked_reason(Reference(key, stage, sig), read_summary(folder))
    if reason is not None:
        raise RunBlocked(reason, sig)
    from caitlab.models.checkpoint import resolve_checkpoint  # torch: the launcher reads this

    return str(resolve_checkpoint(folder))


def stage_facts(stage: Any, stages: Any) -> dict[str, Any]:
    """A run's stage as its summary records it: the name, and its place in the chain (the
    report's order)."""
    if stage is None:
        return {}
    names = [str(k) for k in stages] if isinstance(stages, Iterable) else []
    return {"stage": str(stage),
            **({"stage_index": names.index(str(stage))} if str(stage) in names else {})}


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)
