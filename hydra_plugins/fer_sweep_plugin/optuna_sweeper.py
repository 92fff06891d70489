"""``hydra/sweeper=optuna``: Hydra takes sweepers from this package only; the search itself
(workers sharing one Optuna study, pruning, resume) is fer_sweep.sweep.searcher."""

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Reads its settings from the composed config (``hydra.sweeper``); the sampler and pruner
    are built in each worker job from the same config, never here."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from fer_sweep.sweep import searcher

        return searcher.sweep(self.config, self.launcher, arguments)
