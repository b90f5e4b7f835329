# The README's commands. Each target installs what it needs, so on a fresh machine
#   make demo   runs the whole slimming pipeline on Fashion-MNIST (quick preset)
#   make test   installs the test extras (everything the suite imports) and runs the test suite
PYTHON ?= python3
# torch is installed first and pinned: a bare `pip install torch` (or a range that admits a
# newer release) would pull several GB of CUDA packages. A torch already present is kept when
# it meets pyproject's floor (torch>=2.13); an older one is replaced by the pinned build here,
# not by whatever newer torch pip would pick to satisfy the floor.
TORCH ?= torch==2.13.0
HAVE_TORCH = $(PYTHON) -c "import sys, torch; sys.exit(tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2, 13))" 2>/dev/null
RUN ?= runs/quick
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install install-dev data demo test bench

install:
	@$(HAVE_TORCH) || $(PYTHON) -m pip install -q "$(TORCH)"
	@$(PYTHON) -m pip install -q -e ".[plot]"

install-dev:
	@$(HAVE_TORCH) || $(PYTHON) -m pip install -q "$(TORCH)"
	@$(PYTHON) -m pip install -q -e ".[test]"

# Fashion-MNIST: the Debian package when we may install it, else netslim's --download.
data:
	@if [ ! -f $(FMNIST) ] && [ -z "$$NETSLIM_DATA" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
		echo "apt-get could not install dataset-fashion-mnist; netslim will --download it"; \
	fi

demo: install data
	netslim pipeline --preset quick --save $(RUN) --download

test: install-dev
	$(PYTHON) -m pytest

bench: install-dev
	$(PYTHON) benchmarks/bench_inference.py
	$(PYTHON) benchmarks/bench_train.py
