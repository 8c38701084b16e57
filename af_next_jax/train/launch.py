"""Join the job's other processes before any other JAX call (`jax.distributed.initialize`).

Where the job's shape comes from, first match wins:

  1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I`, or the environment
     variables AF_NEXT_COORDINATOR / AF_NEXT_NUM_PROCESSES / AF_NEXT_PROCESS_ID (jax's own
     JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are read too);
  2. a cluster that jax detects by itself (`jax._src.clusters`): SLURM (`srun`: SLURM_JOB_ID,
     SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), Cloud TPU VMs and GKE TPU
     pods (XPK, JobSet: TPU_WORKER_HOSTNAMES / MEGASCALE_*), Open MPI (`mpirun`), Kubernetes;
  3. otherwise a single process: nothing is initialised, exactly as before.

A detected cluster with one process is a single process too. Under SLURM or Open MPI with one
process per node, the process drives all the node's GPUs (jax's own detection gives each process the
one GPU of its local rank, which fits only one process per GPU; that rule still applies with
several processes per node). On CPU hosts the gloo collectives are selected, so a multi-process run works
on one machine (the tests run 2 processes x 4 fake CPU devices on 127.0.0.1).
"""

from __future__ import annotations

import dataclasses
import logging
import os

logger = logging.getLogger("af_next_jax.train")

ENV_COORDINATOR = "AF_NEXT_COORDINATOR"
ENV_NUM_PROCESSES = "AF_NEXT_NUM_PROCESSES"
ENV_PROCESS_ID = "AF_NEXT_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started: `cluster` is "single", "explicit" or jax's cluster name."""

    cluster: str
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None

    @property
    def multiprocess(self) -> bool:
        return self.num_processes > 1


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return value
    return None


def _int(value, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _detected_cluster():
    """jax's cluster environment class that matches this process's environment, or None."""
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover -- jax moved its cluster registry
        return None
    for cluster in clusters.ClusterEnv._cluster_types:
        if getattr(cluster, "opt_in_only_method", False) or cluster.__name__ in ("ClusterEnv", "BaseTpuCluster"):
            continue
        try:
            if cluster.is_env_present():
                return cluster
        except Exception as error:  # noqa: BLE001 -- a probe that fails means: not this cluster
            logger.debug("cluster probe %s failed: %s", cluster.__name__, error)
    return None


def _slurm_tasks_on_this_node() -> int | None:
    """Tasks of this job step on this node (SLURM_STEP_TASKS_PER_NODE like "2(x3),1"), or None."""
    counts = _env("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    node_id = _int(_env("SLURM_NODEID"), "SLURM_NODEID")
    if counts is None:
        return None
    expanded = []
    for part in counts.split(","):
        count, _, repeat = part.partition("(x")
        expanded += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    if node_id is not None and node_id < len(expanded):
        return expanded[node_id]
    return expanded[0] if len(set(expanded)) == 1 else None


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> Launch:
    """The job's shape from flags, environment or cluster detection (no JAX call is made)."""
    coordinator = coordinator or _env(ENV_COORDINATOR, "JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _int(
        _env(ENV_NUM_PROCESSES, "JAX_NUM_PROCESSES"), "the number of processes")
    process_id = process_id if process_id is not None else _int(_env(ENV_PROCESS_ID, "JAX_PROCESS_ID"),
                                                               "the process id")
    if coordinator is not None or num_processes is not None or process_id is not None:
        if num_processes is not None and num_processes == 1:
            return Launch("explicit", coordinator, 1, process_id or 0)
        missing = [name for name, value in (("--coordinator", coordinator), ("--num-processes", num_processes),
                                            ("--process-id", process_id)) if value is None]
        if missing:
            raise ValueError(f"a multi-process launch needs --coordinator HOST:PORT, --num-processes N and "
                             f"--process-id I (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                             f"missing {missing}")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator must be HOST:PORT (process 0's host and a free port), got {coordinator!r}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must lie in [0, {num_processes}), got {process_id}")
        return Launch("explicit", coordinator, num_processes, process_id)

    cluster = _detected_cluster()
    if cluster is None:
        return Launch("single")
    name = getattr(cluster, "name", "") or cluster.__name__
    count = cluster.get_process_count()
    if count <= 1:
        return Launch(name, None, 1, 0)
    port = os.environ.get("JAX_COORDINATOR_PORT")
    address = cluster.get_coordinator_address(timeout_secs=300, override_coordinator_port=port)
    # jax's own rule gives each process the one GPU numbered by its local rank. That fits one process
    # per GPU; with one process per node (our meshes: a node = a DCN granule) it must see all of them.
    local_id = cluster.get_local_process_id()
    on_this_node = _processes_on_this_node(name)
    local_ids = (local_id,) if local_id is not None and on_this_node != 1 else None
    return Launch(name, address, count, cluster.get_process_id(), local_ids)


def _processes_on_this_node(cluster_name: str) -> int | None:
    if cluster_name == "slurm":
        return _slurm_tasks_on_this_node()
    if cluster_name == "ompi":
        return _int(_env("OMPI_COMM_WORLD_LOCAL_SIZE"), "OMPI_COMM_WORLD_LOCAL_SIZE")
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, initialization_timeout: int = 300) -> Launch:
    """Resolve the launch and, with several processes, call `jax.distributed.initialize` (call first)."""
    global _CURRENT
    launch = resolve(coordinator, num_processes, process_id)
    _CURRENT = launch
    if not launch.multiprocess:
        return launch
    import jax

    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        # Only the CPU client reads it: cross-process collectives on CPU devices (tests, CPU clusters).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=launch.coordinator, num_processes=launch.num_processes, process_id=launch.process_id,
        local_device_ids=list(launch.local_device_ids) if launch.local_device_ids else None,
        cluster_detection_method="deactivate", initialization_timeout=initialization_timeout)
    return launch


def describe(launch: Launch) -> str:
    """One log line: cluster, process, devices (call after `initialize`)."""
    import jax

    local = jax.local_devices()
    kinds = sorted({device.device_kind for device in jax.devices()})
    where = {"single": "single process", "explicit": f"explicit launch, coordinator {launch.coordinator}"}.get(
        launch.cluster, f"{launch.cluster} cluster detected, coordinator {launch.coordinator}")
    return (f"{where}: process {jax.process_index()} of {jax.process_count()}, {len(local)} local devices "
            f"({local[0].platform}: {', '.join(str(d.id) for d in local)}), {jax.device_count()} global "
            f"devices ({', '.join(kinds)})")


_CURRENT: Launch | None = None


def current() -> Launch:
    """The launch `initialize` made in this process (a single process if it was never called)."""
    return _CURRENT or Launch("single")


def shutdown() -> None:
    """Leave the job cleanly (waits for the other processes); a no-op for a single process."""
    if current().multiprocess:
        import jax

        jax.distributed.shutdown()
