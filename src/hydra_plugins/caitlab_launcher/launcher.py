"""Hydra launchers for sweeps on SLURM (and submitit's local executor), sweep-aware.

hydra-submitit-launcher 1.2.0 does the submission (one job array, submitit's requeue on
preemption/time-out through ``checkpoint``). On top of it, as Hydra's maintainers suggest for
custom logic, these subclasses:

- resolve each job's run folder (its config signature) before submitting, and submit only
  the runs that are not completed; failed or diverged runs only with ``retry_failed=true``;
- write ``summary.json`` with ``status: pending`` and the SLURM job id for every submitted
  run, so ``caitlab-sweep status`` sees the whole sweep at once;
- with ``wait: false``, return once the array is submitted instead of waiting for it.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import config as hsl_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as hsl
from omegaconf import OmegaConf

from caitlab.runs import RETRY_ONLY, Summary, read_summary, signature, skip_reason

log = logging.getLogger(__name__)


def _skipped(overrides: list[str], summary: dict[str, Any]) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    ret.return_value = summary.get("test/top1")
    return ret


class _SweepAwareMixin:
    """Launch only what a sweep still needs (see the module doc)."""

    def __init__(self, wait: bool = True, **params: Any) -> None:
        super().__init__(**params)
        self.wait = wait

    def _plan(self, job_overrides) -> tuple[list[tuple[int, list[str], Path]], list[JobReturn]]:
        todo, skipped = [], []
        retry = bool(self.config.get("retry_failed", False))
        for idx, overrides in enumerate(job_overrides):
            overrides = list(overrides)
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            run_dir = Path(str(cfg.hydra.sweep.dir)) / signature(cfg)
            previous = read_summary(run_dir) or {}
            reason = skip_reason(previous, retry)
            if reason is not None:
                log.info(f"\tskipping {' '.join(overrides)}: {reason} ({run_dir})")
                skipped.append(_skipped(overrides, previous))
            else:
                todo.append((idx, overrides, run_dir))
        return todo, skipped

    def launch(self, job_overrides, initial_job_idx: int):
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        todo, skipped = self._plan(job_overrides)
        log.info(f"caitlab sweep: {len(todo)} to run, {len(skipped)} already done "
                 f"({self.config.hydra.sweep.dir})")
        if not todo:
            return skipped

        params = dict(self.params)
        init_params = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init_params[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base = set(OmegaConf.structured(hsl.BaseQueueConf).keys())
        executor.update_parameters(**{
            k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()
        })
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)

        job_params = []
        for idx, overrides, _ in todo:
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((overrides, "hydra.sweep.dir", initial_job_idx + idx,
                               f"job_id_for_{initial_job_idx + idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params, strict=True))

        for job, (_, overrides, run_dir) in zip(jobs, todo, strict=True):
            summary = Summary(run_dir, {"overrides": overrides, "signature": run_dir.name,
                                        "name": self.config.get("name")})
            if summary.get("status") in (None, "pending", "interrupted", *RETRY_ONLY):
                summary.update(status="pending", slurm_job_id=str(job.job_id))
        log.info(f"submitted {len(jobs)} runs as job array {jobs[0].job_id.split('_')[0]}")
        if not self.wait:
            log.info("not waiting (hydra.launcher.wait=false): follow it with "
                     f"caitlab-sweep status {sweep_dir}")
            return skipped + [_skipped(o, {}) for _, o, _ in todo]
        returns = []
        for job, (_, overrides, run_dir) in zip(jobs, todo, strict=True):
            try:
                returns.append(job.results()[0])
            except Exception as err:  # a job that died hard must not hide the others' results
                log.error(f"job {job.job_id} ({run_dir}) ended without a result: "
                          f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}")
                returns.append(_skipped(overrides, read_summary(run_dir) or {}))
        return skipped + returns


class SlurmLauncher(_SweepAwareMixin, hsl.SlurmLauncher):
    pass


class LocalLauncher(_SweepAwareMixin, hsl.LocalLauncher):
    pass


@dataclass
class SlurmConf(hsl_config.SlurmQueueConf):
    _target_: str = "hydra_plugins.caitlab_launcher.launcher.SlurmLauncher"
    wait: bool = True
    # untyped so they can interpolate `cluster.*` (a typed List/Dict field cannot)
    setup: Any = None
    additional_parameters: Any = None


@dataclass
class LocalConf(hsl_config.LocalQueueConf):
    _target_: str = "hydra_plugins.caitlab_launcher.launcher.LocalLauncher"
    wait: bool = True


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="hydra/launcher", name="caitlab_slurm", node=SlurmConf, provider="caitlab")
    store.store(group="hydra/launcher", name="caitlab_local", node=LocalConf, provider="caitlab")


register_configs()
