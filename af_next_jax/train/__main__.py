"""`python -m af_next_jax.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.key=value ...]`.

Running the same command again resumes from the newest checkpoint in DIR.

Several processes (one per host, or per GPU node) run the same command. They find each other
before any other JAX call: under SLURM (`srun`), on Cloud TPU VMs / GKE (XPK, JobSet) and under
Open MPI with no extra arguments (jax's cluster detection); anywhere else with
`--coordinator HOST:PORT --num-processes N --process-id I` (or AF_NEXT_COORDINATOR,
AF_NEXT_NUM_PROCESSES, AF_NEXT_PROCESS_ID). With none of these it is one process. See
docs/TRAINING.md ("Several processes") and docs/SCALING.md for launch recipes.

Exit codes: 0 finished or preempted (saved); 2 bad arguments, an experiment that cannot run on these
devices (af_next_jax/experiment: the message says what to change), or the workdir's checkpoints cannot
be used (they belong to another experiment, cannot be read, or their data positions do not fit this
process count: the message says what to do, nothing was moved), or the processes of a row group read
different data (different flags or files on one host: nothing was trained on it), or another run
holds the workdir (the message names it; af_next_jax/holder.py), or a checkpoint or the export could
not be written for lack of disk space (the message says how much is needed where; the partial write was
removed and the same command resumes from the last complete step once space is freed); 3 stopped by
non-finite losses;
1 any other error.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # first, before JAX starts: XLA flags, allocator, platforms (process_setup.py)
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiments/NAME.py or experiments/NAME.py:ARG")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard and logs go here")
    parser.add_argument("--coordinator", default=None,
                        help="HOST:PORT of process 0 (a free port on it), for a multi-process launch without a "
                             "detected cluster; env AF_NEXT_COORDINATOR")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="processes in the job (with --coordinator); env AF_NEXT_NUM_PROCESSES")
    parser.add_argument("--process-id", type=int, default=None,
                        help="this process's index in [0, N) (with --coordinator); env AF_NEXT_PROCESS_ID")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.optimizer.learning_rate=1e-4")
        overrides.append(item)

    # Before any other JAX call: join the other processes of the job (if any).
    from af_next_jax.train import launch

    try:
        launch.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as error:
        parser.error(str(error))

    from af_next_jax.train.checkpointing import CheckpointIOError, CheckpointMismatchError
    from af_next_jax.experiment import ExperimentError, load_config
    from af_next_jax.disk_space import DiskFull, is_disk_full
    from af_next_jax.holder import DirectoryHeld
    from af_next_jax.train.host_data import DataShardError, GroupDataMismatch
    from af_next_jax.train.loop import NonFiniteLossError, train

    config = load_config(args.config, overrides)
    try:
        result = train(config, args.workdir)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (CheckpointMismatchError, CheckpointIOError, DataShardError, ExperimentError, GroupDataMismatch,
            DirectoryHeld, DiskFull) as error:
        logging.getLogger("af_next_jax.train").error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not is_disk_full(error):
            logging.getLogger("af_next_jax.train").exception("training failed")
            raise
        # The disk filled under another write (metrics, logs) before a checkpoint save saw it.
        print(f"error: no space left on the filesystem of {args.workdir} ({type(error).__name__}: "
              f"{(str(error).splitlines() or [''])[0][:300]}). Free space there and run the same command again: it resumes "
              f"from the last complete checkpoint.", file=sys.stderr)
        return 2
    except BaseException:
        logging.getLogger("af_next_jax.train").exception("training failed")
        raise
    print(f"{result.status} at step {result.step}; final loss {result.final_loss}; workdir {result.workdir}")
    launch.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
