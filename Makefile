# Every target the README names. `make test` and `make train` install first when needed.
#
# Two ways to install, chosen once:
# - PYTHON (default python3) already imports torch, as on a GPU box or a cluster image, often
#   with no package registry: use that Python as it is, with the torch built for its CUDA, and
#   download nothing unless a dependency is missing (then only that one, with pip).
# - Otherwise: `.venv`, with the small CPU wheel of torch when there is no NVIDIA driver (PyPI's
#   default Linux wheel is a multi-GB CUDA build) and PyPI's CUDA wheel when there is one.
#   Override with `make install TORCH=...`.
PYTHON ?= python3
ifeq ($(wildcard .venv/.installed),)
HAVE_TORCH := $(shell $(PYTHON) -c "import torch" 2>/dev/null && echo yes)
endif
ifeq ($(HAVE_TORCH),yes)
PY    := $(PYTHON)
STAMP := .deps-checked
else
PY    := .venv/bin/python
STAMP := .venv/.installed
endif
# import name:package, for the check of an existing Python; Triton, pinned as pyproject's interpreter extra, only
# where its torch brought none
DEPS := torch:torch nvidia.dali:nvidia-dali-cuda120 numpy:numpy torchsummary:torchsummary \
        tensorboard:tensorboard tqdm:tqdm PIL:pillow pytest:pytest xdist:pytest-xdist triton:triton==3.9.0

ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH ?= torch==2.13.0 --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu
else
TORCH ?= torch
endif

.PHONY: install test lint train smoke bench sweep data tensorboard gpu-check eval predict export results clean

install: $(STAMP)
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[$$($(PY) -c "$$TRITON_EXTRA")]"
	@$(MAKE) --no-print-directory $(SIDE_TRITON)
	touch $@
# Without an NVIDIA GPU: the lent GPU's Triton too, alone in a side folder, for the test that builds every kernel
# under it (tests/test_kernels.py; it installs it itself where this did not, or skips). On a GPU the kernels run.
SIDE_TRITON := .cache/triton-3.6.0
$(SIDE_TRITON):
	@if ! command -v nvidia-smi >/dev/null; then rm -rf $@.partial; \
	$(PY) -m pip install -q --no-deps --target $@.partial triton==3.6.0 && mv $@.partial $@ \
	|| echo "note: triton 3.6.0 not installed into $@ (no registry?): the build test under it will skip"; fi
.deps-checked: pyproject.toml
	@set -- $$($(PY) -c "$$MISSING" $(DEPS)); version=$$1; shift; \
	echo "using $(PY) as it is (torch $$version)"; \
	if [ -n "$$*" ]; then echo "installing what it lacks: $$*"; $(PY) -m pip install "$$@" || exit 1; \
	else echo "every dependency is there: nothing to install"; fi
	touch $@
# The extras to install beside torch: the interpreter's Triton only where torch brought none (pyproject.toml says why).
define TRITON_EXTRA
import importlib.util
print("test" if importlib.util.find_spec("triton") else "test,interpreter")
endef
export TRITON_EXTRA

# torch's version, then the packages among DEPS whose module does not import (one process: torch
# is imported once).
define MISSING
import importlib, sys
import torch
missing = []
for dep in sys.argv[1:]:
    module, package = dep.split(":")
    try:
        importlib.import_module(module)
    except ImportError:
        missing.append(package)
print(torch.__version__, *missing)
endef
export MISSING

# Tests run on every core at once (pytest-xdist); the tests that share a training run stay together.
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadgroup $(ARGS)

# ruff (pyproject.toml: line length 120, pycodestyle, pyflakes, import order); in the test extra, so in .venv.
lint: $(STAMP)
	@$(PY) -m ruff --version >/dev/null 2>&1 || { echo "error: ruff is not installed for $(PY); pip install ruff" >&2; exit 2; }
	$(PY) -m ruff check .

# Default data/ is fetched first when missing (not when ARGS name --data, --resume or --smoke).
# SEEDS="0 1 2": the same settings once per seed (into RUNS, default runs/), then the results of the folder
# they went to (an --runs in ARGS wins, as it does for train.py).
train: $(STAMP)
	$(if $(findstring --data,$(ARGS))$(findstring --resume,$(ARGS))$(findstring --smoke,$(ARGS)),,@test -e data || $(MAKE) data)
	$(if $(SEEDS),for seed in $(SEEDS); do $(PY) train.py --seed $$seed $(if $(RUNS),--runs $(RUNS)) $(ARGS) || exit $$?; \
	done; $(PY) results.py --as-trained $(if $(RUNS),--runs $(RUNS)) $(ARGS),$(PY) train.py $(ARGS))

# Finished runs grouped by settings, mean ± std over seeds (RUNS: another folder of runs).
results: $(STAMP)
	$(PY) results.py $(or $(RUNS),runs)

# After training: RUN names a run folder (runs/<name>); ARGS passes flags (--tta, --checkpoint last, ...).
RUN_GIVEN = $(if $(RUN),,$(error name the run: make $@ RUN=runs/<name>))
eval: $(STAMP)
	$(RUN_GIVEN)$(PY) evaluate.py "$(RUN)" $(ARGS)
predict: $(STAMP)
	$(RUN_GIVEN)$(if $(IMAGES),,$(error name the images: make predict RUN=$(RUN) IMAGES="a.png b.jpg"))$(PY) predict.py "$(RUN)" $(IMAGES) $(ARGS)
export: $(STAMP)
	$(RUN_GIVEN)$(PY) export.py "$(RUN)" $(ARGS)

# A recipe sweep: every variant of PLAN (bench/plans/) for each of its seeds, into RUNS (default runs/<plan>),
# ranked in RUNS/sweep.md; ARGS: --parallel K, --budget-s N. The same command again resumes it.
sweep: $(STAMP)
	$(if $(PLAN),,$(error name the plan: make sweep PLAN=bench/plans/fast-15.txt))$(PY) -m bench.sweep "$(PLAN)" --runs "$(or $(RUNS),runs/$(basename $(notdir $(PLAN))))" $(ARGS)

smoke: $(STAMP)
	$(PY) train.py --smoke $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

data: $(STAMP)
	$(PY) -m pipelines.fetch $(if $(SRC),--src "$(SRC)")

# Training curves by default; the bench's scalars with `make tensorboard LOGDIR=bench/tensorboard`.
LOGDIR ?= runs
tensorboard: $(STAMP)
	$(PY) -m tensorboard.main --logdir $(LOGDIR) $(ARGS)

# On a CUDA machine: the CUDA tests, GPU pipeline and compile figures, then the bench, in one
# report under OUT (default gpu-check/). Without CUDA it says so and stops.
OUT ?= gpu-check
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check --out $(OUT) $(ARGS)

clean:  # the environment and caches; data/ and runs/ hold results and stay
	rm -rf .venv .deps-checked .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
