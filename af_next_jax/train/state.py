"""The parameters a run starts from when `init_from` names a converted checkpoint or an earlier run."""

from __future__ import annotations

import logging

import jax
import numpy as np

logger = logging.getLogger(__name__)


def load_initial_params(path: str, abstract_params: dict) -> dict:
    """Parameters for `init_from`: a converted checkpoint (`convert from-hf`) or the workdir of a previous
    stage (its final export), found the way every command finds a model (convert/sources.py).

    Shapes must match this experiment's model; the error lists the first mismatches.
    """
    from af_next_jax.convert.errors import BadInputError
    from af_next_jax.convert.sources import resolve

    try:
        source = resolve(path)
    except BadInputError as error:
        raise FileNotFoundError(f"init_from={path!r}: {error}") from None
    params = source.load_params()
    expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
    found = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"{key}: expected {shape}, found {found.get(key, 'nothing')}"
                for key, shape in expected.items() if found.get(key) != shape]
    problems += [f"{key}: not in this model" for key in found.keys() - expected.keys()]
    if problems:
        raise ValueError(f"init_from={path} ({source.description}) does not fit this experiment's model "
                         f"({len(problems)} problems): " + "; ".join(problems[:5]))
    logger.info("initialising parameters from %s", source.description)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)
