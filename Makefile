# fedmpi — `make help` lists the targets.
#
# Environment switches (set on the command line, e.g. `make test MPI=system`):
#   MPI=mpich   (default) mpi4py with the MPICH wheel from PyPI: no system MPI needed
#   MPI=system  build mpi4py against the MPI whose `mpicc` is on PATH (a cluster's own MPI;
#               load its module first) and launch with that MPI's `mpiexec`
#   TORCH_SPEC  what pip installs for torch (default: the pinned CPU build)
#   PYTHON      interpreter used to create .venv (default python3, needs >= 3.10)

PYTHON     ?= python3
VENV       ?= .venv
MPI        ?= mpich
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
ifeq ($(MPI),system)
MPIEXEC    ?= mpiexec
else
MPIEXEC    ?= $(abspath $(VENV))/bin/mpiexec
endif
export OMP_NUM_THREADS=1
export MPLBACKEND=Agg
# every test run starts hundreds of Python processes: let them reuse fedmpi's compiled bytecode
# (__pycache__, git-ignored) even where the environment turns caching off (0.2 s a process here)
unexport PYTHONDONTWRITEBYTECODE

BENCH_RANKS  ?= 3
BENCH_CONFIG ?= bench/fmnist_campaign.yaml

.PHONY: help test test-unit test-mpi bench plots data clean venv

help:
	@echo "make test    create $(VENV) if missing, install everything, run the whole test suite (then test-mpi)"
	@echo "make test-unit  the fast tests only: no end-to-end runs (marker slow), no mpi, no slurm"
	@echo "make test-mpi   the tests marked mpi, inside mpiexec -n 2 and -n 4 (pytest-mpi)"
	@echo "make bench   default local benchmark on Fashion-MNIST under mpiexec, then the figures"
	@echo "make plots   redraw every figure in plots/ from results/*.h5"
	@echo "make bench-perf  fedmpi vs the bare PyTorch loop (results/perf/*.json, then plots); PERF_ARGS=--quick: a smoke run"
	@echo "make bench-scale  1,000 clients per round on 3-8 ranks: round time, rank-0 memory (results/perf/scale.json); SCALE_ARGS=--quick: a smoke run"
	@echo "make clean   remove caches and plots (keeps $(VENV) and results/)"
	@echo "switches: MPI=system (cluster MPI), BENCH_RANKS=$(BENCH_RANKS), TORCH_SPEC='$(TORCH_SPEC)'"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py fedmpi/sparse_kernels/csr_simd.c fedmpi/aggregation/grid_pass.c Makefile examples/topk_fedavg/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "fedmpi needs Python >= 3.10 (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: anything that depends on torch must find it already installed
	$(PY) -m pip install --quiet --no-compile "$(TORCH_SPEC)"
ifeq ($(MPI),system)
	$(PY) -m pip install --quiet --no-compile --no-binary=mpi4py --no-cache-dir mpi4py
	$(PY) -m pip install --quiet --no-compile -e ".[test]"
else
	$(PY) -m pip install --quiet --no-compile -e ".[test,mpich]"
endif
	# the worked plug-in example (docs/extending.md): an out-of-tree package, tested by make test
	$(PY) -m pip install --quiet --no-compile --no-deps -e examples/topk_fedavg
	# pip compiled nothing (--no-compile: 25 s, most of it torch modules fedmpi never imports);
	# importing what fedmpi runs with writes the bytecode of exactly those modules, once
	$(PY) -c "import torch, mpi4py.MPI, h5py, matplotlib.pyplot, pytest, fedmpi.campaigns, fedmpi.engine, \
	  fedmpi.figures; print('fedmpi env ready: torch', torch.__version__)"
	touch $@

# pytest is told which mpiexec to launch its runs on several ranks with (tests/helpers.py, find_mpiexec);
# markers (pyproject.toml): slow = end-to-end runs over a few seconds, mpi = inside mpiexec, slurm
PYTEST := MPIEXEC=$(MPIEXEC) $(PY) -m pytest -q

# TEST_JOBS pytest-xdist workers for the one-process suite: its end-to-end runs leave a core idle
# for part of their time (MPI and SLURM waits), so 3 on 2 cores (4:25 against 5:11 with 2, here);
# 1 runs it without xdist. --dist loadgroup: the tests of one cluster (SLURM, the namespace
# nodes; marked xdist_group) go to one worker instead of workers waiting on the cluster's lock
TEST_JOBS ?= 3
test: venv
	$(PYTEST) $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadgroup) tests
	$(MAKE) --no-print-directory test-mpi

test-unit: venv
	$(PYTEST) -m "not slow and not mpi and not slurm" tests

test-mpi: venv
	MPIEXEC=$(MPIEXEC) $(MPIEXEC) -n 2 $(PY) -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests
	MPIEXEC=$(MPIEXEC) $(MPIEXEC) -n 4 $(PY) -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests

bench: venv data
	$(PY) -m fedmpi sweep $(BENCH_CONFIG) --local --ranks $(BENCH_RANKS)
	$(MAKE) plots

plots: venv
	$(PY) -m fedmpi plots --results results --plots plots

# performance benchmark (bench/perf/run.py, docs/performance.md): interleaved, 5 repeats; quiet machine please
.PHONY: bench-perf
PERF_ARGS ?=
bench-perf: venv data
	MPIEXEC=$(MPIEXEC) $(PY) bench/perf/run.py $(PERF_ARGS)
	$(MAKE) plots

# 1,000 clients per round on up to 8 ranks (bench/perf/scale.py, docs/performance.md "Scale run"): quiet machine, >= 8 cores
.PHONY: bench-scale
SCALE_ARGS ?=
bench-scale: venv data
	MPIEXEC=$(MPIEXEC) $(PY) bench/perf/scale.py $(SCALE_ARGS)

# Fashion-MNIST for the bench: Debian's package when we can install it, else say what to do.
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
	  { echo "could not install dataset-fashion-mnist; put the four Fashion-MNIST IDX files in a directory and run: make bench FMNIST_DIR=/that/dir (and set data.root)"; exit 1; }; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR): install Debian's dataset-fashion-mnist (as root) or put the four IDX files (train-images-idx3-ubyte[.gz] ...) in a directory and set data.root in $(BENCH_CONFIG)"; exit 1; \
	fi

clean:
	rm -rf .pytest_cache build *.egg-info plots/*.png plots/*.md
	find . -name __pycache__ -prune -exec rm -rf {} +
