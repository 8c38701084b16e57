"""The experiment's train and eval steps, compiled for a TPU topology from abstract values only.

The Program comes from `af_next_jax.experiment.build_program`, the builder the trainer uses; the
devices are the compile-only devices of a TPU topology, so `lower().compile()` runs libtpu's compiler
on this host and nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import time

import ml_collections

from af_next_jax.experiment import Program, build_program, experiment_from
from af_next_jax.experiment.settings import tokenizer_ids


@dataclasses.dataclass
class CompiledStep:
    name: str                      # "train" | "eval"
    compiled: object               # jax.stages.Compiled
    seconds: float                 # lower + compile wall time
    inputs: dict                   # {"parameters": tree, "optimizer state": tree, "batch": tree} of abstract arrays


@dataclasses.dataclass
class CompiledExperiment:
    program: Program
    train: CompiledStep
    eval: CompiledStep | None

    @property
    def mesh_sizes(self) -> dict:
        return self.program.mesh_sizes

    @property
    def model_config(self):
        return self.program.experiment.model

    @property
    def analytic_flops(self) -> float:
        """One train step, whole mesh."""
        return self.program.flops_per_step


def compile_tool_program(config: ml_collections.ConfigDict, devices) -> Program:
    """The Program `python -m af_next_jax.compile` compiles: the trainer's (with the tokenizer's audio ids
    when the experiment's tokenizer file is on this host, as the trainer would read it)."""
    return build_program(experiment_from(config, tokenizer_ids(config, required=False)), devices)


def compile_experiment(config: ml_collections.ConfigDict, devices, *, with_eval: bool = True) -> CompiledExperiment:
    program = compile_tool_program(config, devices)
    state = program.abstract_state()
    train = _compile(program, "train", {"parameters": state.params, "optimizer state": state.opt_state,
                                        "batch": program.step_batch})
    evaluation = None
    if with_eval:
        evaluation = _compile(program, "eval", {"parameters": state.params, "optimizer state": {},
                                                "batch": program.micro_batch})
    return CompiledExperiment(program, train, evaluation)


def _compile(program: Program, name: str, inputs) -> CompiledStep:
    start = time.perf_counter()
    compiled = program.lower(name).compile()
    return CompiledStep(name, compiled, time.perf_counter() - start, inputs)
