# supabackup: `make demo` runs the whole job locally; `make test` runs the test suite.
# Both work on a fresh machine after `make setup` (which they call themselves).

# Python 3.12, as on Lambda: a python3.12 that runs, else pyenv's newest 3.12, else python3.
PYTHON ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	{ v=$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1); \
	  [ -n "$$v" ] && PYENV_VERSION=$$v pyenv which python; } 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PG17   := build/postgresql-17/.version
# aws-sam-cli and checkov pin conflicting versions of shared packages: a venv each; AWS's
# Lambda runtime client has one too, as the artifact test's /var/runtime.
TOOLS  := build/tools/sam/.installed build/tools/checkov/.installed \
          build/tools/lambdaric/.installed

.PHONY: setup test demo bench bench-parallel bench-capture bench-storage model-large lint layer clean fuzz

setup: $(VENV)/.installed $(PG17)

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# PostgreSQL 17 client and server binaries (pinned, checksummed) for the tests and demo.
$(PG17): layers/postgresql.lock layers/fetch_postgres.py $(VENV)/.installed
	$(BIN)/python layers/fetch_postgres.py build/postgresql-17

build/tools/%/.installed: requirements-%.txt
	rm -rf build/tools/$*
	$(PYTHON) -m venv build/tools/$*
	build/tools/$*/bin/pip install --quiet --upgrade pip
	build/tools/$*/bin/pip install --quiet -r $<
	touch $@

# devkit/preflight.py: what the system must provide (PostgreSQL 15 and wal2json, the
# libraries PostgreSQL 17 links, setpriv...); a lack is one line with its apt-get command.
test: setup $(TOOLS)
	@$(BIN)/python -m devkit.preflight test
	$(BIN)/pytest

# The differential harness for longer, with random seeds (or SEEDS=1,2,3): each failing
# case is shrunk and written to build/fuzz/ with its seed and SQL.
MINUTES ?= 10
SEEDS   ?=
fuzz: setup
	$(BIN)/python -m devkit.differential --minutes $(MINUTES) $(if $(SEEDS),--seeds $(SEEDS))

demo: setup
	@$(BIN)/python -m devkit.preflight demo
	$(BIN)/python -m devkit.demo

bench: setup
	$(BIN)/python bench/bench_full.py

# Parallel backups and restores over a slow link (bench/README.md); about 9 minutes.
bench-parallel: setup
	$(BIN)/python bench/bench_parallel.py

# Change capture: commit -> stored latency, the WAL rate a stream keeps up with, replay
# speed of restore --at, Lambda cost on paper (bench/README.md); about 3 minutes.
bench-capture: setup
	$(BIN)/python bench/bench_capture.py

# Storage files: supabackup's file copy against `aws s3 sync` (awscli in a venv of its
# own, requirements-awscli.txt), and what an incremental stores (bench/README.md); about
# N minutes. A quick run: BENCH_STORAGE_SMALL=1000 BENCH_STORAGE_LARGE=2 make bench-storage
bench-storage: setup build/tools/awscli/.installed
	$(BIN)/python bench/bench_storage.py

# Large databases on paper: backup and restore times on Lambda and Fargate and a month's
# cost, from bench-parallel's figures (bench/results/parallel.json, else those recorded in
# bench/README.md); a second.
model-large: setup
	$(BIN)/python bench/model_large.py

lint: setup
	$(BIN)/ruff check functions devkit tests bench layers
	$(BIN)/mypy functions/supabackup

layer: setup
	$(MAKE) -C layers layer PYTHON="$(abspath $(BIN)/python)"

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
