# meddiff-fl: `make run` trains federated on the embedded phantoms, `make test` runs the test suite.
# Both create .venv when missing and install the CPU torch wheel first (an unpinned torch would
# pull a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
RUN_NAME ?= quickstart

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: run run-dp train-centralized test test-fast bench bench-dp-quality bench-segmentation bench-translation setup clean

# uv installs the rest in seconds (pip's byte-compilation of Ray alone takes a minute); pip is the fallback.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_CPU) uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]' || $(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	FLWR_HOME=$(CURDIR)/.flwr_home PATH=$(CURDIR)/$(BIN):$$PATH \
	  $(BIN)/meddiff simulate --config configs/default.yaml output.name=$(RUN_NAME)-$$(date +%Y%m%d-%H%M%S)

run-dp: $(STAMP)
	FLWR_HOME=$(CURDIR)/.flwr_home PATH=$(CURDIR)/$(BIN):$$PATH \
	  $(BIN)/meddiff simulate --config configs/dp.yaml output.name=$(RUN_NAME)-dp-$$(date +%Y%m%d-%H%M%S)

train-centralized: $(STAMP)
	$(BIN)/meddiff train --config configs/default.yaml output.name=centralized-$$(date +%Y%m%d-%H%M%S)

# Two xdist workers, one test file per worker at a time (a file's federations share fixtures).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/unet_speed.py
	$(BIN)/python bench/sampler_speed.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/federation_overhead.py
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/sites_scaling.py
	$(BIN)/python bench/dp_overhead.py
	$(BIN)/python bench/ldm_vs_pixel.py

# DP quality on real PneumoniaMNIST (../shared/data/pneumoniamnist.npz): 5 federated arms, about 25 min on 2 CPU cores.
bench-dp-quality: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/dp_quality.py

bench-segmentation: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/segmentation_utility.py

# Translation, phantom T1 -> T2 at 64x64: 4 federated arms (diffusion, regression, each with and without DP), hours on 2 CPU cores.
bench-translation: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/translation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
