"""Each `train()` run in a process logs to its own workdir's train.log only (a notebook trains several)."""

import logging

from af_next_jax.train.reporting import setup_logging
from af_next_jax.workdir import Workdir


def test_a_second_run_in_the_same_process_does_not_write_into_the_first_runs_log(tmp_path):
    root = logging.getLogger()
    before = list(root.handlers)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    try:
        setup_logging(Workdir(first))
        logging.getLogger("af_next_jax.train").info("line of the first run")
        setup_logging(Workdir(second))
        logging.getLogger("af_next_jax.train").info("line of the second run")
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
    first_log = (first / "train.log").read_text()
    assert "line of the first run" in first_log and "line of the second run" not in first_log
    assert "line of the second run" in (second / "train.log").read_text()
