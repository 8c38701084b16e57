"""Two local processes x 4 CPU devices (jax.distributed on 127.0.0.1) equal one process x 8 devices.

The function: a projection + hybrid sequence-parallel attention layer (Ulysses 4 inside each process,
ring 2 across the processes, zigzag layout) and a squared-error loss; checked: loss and gradients.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from af_next_jax.parallel import MeshConfig, make_mesh
from tests.parallel import two_process_worker

WORKER = Path(two_process_worker.__file__)
REPO_ROOT = WORKER.parents[2]
TIMEOUT_SECONDS = 150


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    out_path = tmp_path / "two_process.npz"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(rank), str(out_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=TIMEOUT_SECONDS)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert all(worker.returncode == 0 for worker in workers), "\n".join(log[-3000:] for log in logs)

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, ring=2, ulysses=4))
    loss, grads = two_process_worker.sharded_loss_and_grads(
        mesh, lambda array, spec: jax.device_put(array, NamedSharding(mesh, spec)))
    two_process = np.load(out_path)
    np.testing.assert_allclose(two_process["loss"], np.asarray(loss), rtol=1e-6)
    for name, grad in grads.items():
        np.testing.assert_allclose(two_process[name], np.asarray(grad), rtol=1e-5, atol=1e-7)
