"""An experiment: its file (config_files.py), its typed form (settings.py) and what is compiled for it
(program.py: `build_program`, the one place that builds the mesh, shardings and jitted steps)."""

from af_next_jax.experiment.config_files import apply_override, load_config
from af_next_jax.experiment.program import Program, build_program, unbox
from af_next_jax.experiment.settings import (DataSettings, Experiment, ExperimentError, OptimizerConfig, Target,
                                             TrainerConfig, experiment_from, model_config_from)

__all__ = ["apply_override", "load_config", "Program", "build_program", "unbox", "DataSettings", "Experiment",
           "ExperimentError", "OptimizerConfig", "Target", "TrainerConfig", "experiment_from", "model_config_from"]
