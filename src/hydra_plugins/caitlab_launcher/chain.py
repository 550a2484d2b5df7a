"""A sweep over a chain of stages (``caitlab.stages``): each stage's jobs after those of the
stages it names.

caitlab's SLURM launcher submits the whole chain at once (a downstream array waits on its
upstream jobs with ``afterok``) and follows it as one; any other launcher runs one stage
after the other.
"""

import logging
from pathlib import Path
from typing import Any, cast

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from caitlab import compat
from caitlab import stages as chain_of
from caitlab.config import ConfigError
from hydra_plugins.caitlab_launcher.compose import SweepPlan

log = logging.getLogger(__name__)


def sweep(sweeper: Any, stages: Any, arguments: list[str], *, sweep_aware: bool
          ) -> list[list[JobReturn]]:
    """Hydra's sweep of a chain: the stages in order, each one a batch of the launcher's.

    Args:
        sweeper: the ``SweepAwareSweeper`` (its config, launcher and compositions).
        stages: the experiment's ``stages`` node.
        arguments: the sweep's command-line arguments.
        sweep_aware: the launcher is caitlab's (it can plan a batch against the whole
            sweep, and submit a stage without waiting for it).

    Returns:
        Each stage's job results, in order.

    Raises:
        ConfigError: a chain that cannot be expanded, naming the key.
        RunFailed: the first failed run's, once every stage has run (as Hydra's sweep).
    """
    steps = cast("dict[str, Any]", OmegaConf.to_container(stages, resolve=False))
    try:
        chain = chain_of.Chain(steps)
    except chain_of.StageError as err:
        raise ConfigError(str(err)) from None
    sweep_dir = Path(sweeper.config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sweeper.config, sweep_dir / "multirun.yaml")  # as Hydra's sweep does
    batches = chain_batches(chain, [*compat.sweeper_params(sweeper), *arguments],
                            sweeper.hydra_context.config_loader, sweeper.compositions())
    whole = [job for _, batch in batches for job in batch]
    launcher = sweeper.launcher
    at_once = sweep_aware and launcher.cluster == "slurm"
    returns: list[list[JobReturn]] = []
    submitted: list[Any] = []
    idx = 0
    for name, batch in batches:
        sweeper.validate_batch_is_legal(batch)
        log.info(f"stage {name}: {len(batch)} run{'s' * (len(batch) != 1)}")
        if at_once:
            # the snapshots of finished sweeps go once, before the chain's first array
            submitted.append(launcher.submit(batch, idx, whole=whole,
                                             tidy=not any(s.jobs for s in submitted)))
        elif sweep_aware:
            returns.append(launcher.launch(batch, initial_job_idx=idx, whole=whole))
        else:
            returns.append(launcher.launch(batch, initial_job_idx=idx))
        idx += len(batch)
    if at_once:
        returns = launcher.results(submitted)
    for results in returns:
        for r in results:
            _ = r.return_value  # as Hydra's sweep: a failed job's error, once all ran
    return returns


def chain_batches(chain: Any, arguments: list[str], config_loader: Any,
                  plan: SweepPlan) -> list[tuple[str, list[list[str]]]]:
    """A chain's stages as the sweep runs them.

    Args:
        chain: the ``caitlab.stages.Chain``.
        arguments: the sweep's own arguments, expanded as Hydra's basic sweeper expands them.
        config_loader: Hydra's config loader (its parser reads the arguments).
        plan: the sweep's compositions: a reference is written with its upstream's
            signature, the name of that run's folder.

    Returns:
        Each stage's name and its jobs' overrides, in the chain's order.
    """
    parser = OverridesParser.create(config_loader=config_loader)

    def expand(lines: list[str]) -> list[list[str]]:
        return compat.BasicSweeper.split_arguments(parser.parse_overrides(lines), None)[0]

    try:
        return chain.jobs(expand(arguments), expand, lambda job: plan.run_dir(job).name)
    except chain_of.StageError as err:
        raise ConfigError(str(err)) from None
