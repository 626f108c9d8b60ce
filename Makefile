# Every target the README names. `make test` and `make train` install first when needed.
PY    := .venv/bin/python
STAMP := .venv/.installed

# No NVIDIA driver: the small CPU wheel of torch (PyPI's default Linux wheel is a multi-GB
# CUDA build). With one: PyPI's CUDA wheel. Override with `make install TORCH=...`.
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH ?= torch==2.13.0 --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu
else
TORCH ?= torch
endif

.PHONY: install test train smoke bench data tensorboard clean

install: $(STAMP)
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# Default data/ is fetched first when missing (not when ARGS name --data, --resume or --smoke).
train: $(STAMP)
	$(if $(findstring --data,$(ARGS))$(findstring --resume,$(ARGS))$(findstring --smoke,$(ARGS)),,@test -e data || $(MAKE) data)
	$(PY) train.py $(ARGS)

smoke: $(STAMP)
	$(PY) train.py --smoke $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

data: $(STAMP)
	$(PY) -m pipelines.fetch $(if $(SRC),--src "$(SRC)")

# Training curves by default; the bench's scalars with `make tensorboard LOGDIR=bench/tensorboard`.
LOGDIR ?= runs
tensorboard: $(STAMP)
	.venv/bin/tensorboard --logdir $(LOGDIR) $(ARGS)

clean:  # the environment and caches; data/ and runs/ hold results and stay
	rm -rf .venv .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
