# The README's two commands: `make demo` (main job on the embedded local store) and `make test`;
# `make test-fast` is the quick subset (no test marked slow: none trains on real data or starts a server).
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast install dev-install dataset clean reproduce

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# torch and torchvision unpinned together: pip picks matching builds (CPU works; CUDA when present).
install: $(PY)
	$(PY) -m pip install -e .

dev-install: $(PY)
	$(PY) -m pip install -e '.[dev]'

# Fashion-MNIST offline: Debian's package, used when torchvision's download is unreachable.
dataset:
	@if [ ! -d $(FMNIST) ]; then \
	  echo "Fashion-MNIST not found at $(FMNIST): installing Debian's dataset-fashion-mnist (needs root)"; \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)) \
	    || echo "could not install it; sweeper will try torchvision's download instead"; \
	  else echo "not root or no apt-get: sweeper will try torchvision's download instead"; fi; \
	fi

# The main job: the quickstart study (a small grid on Fashion-MNIST, ~2 minutes on a 2-core CPU),
# then its report. Running it again after a kill finishes what is missing.
demo: install dataset
	$(VENV)/bin/sweeper study run studies/quickstart.yaml
	@report="$$($(VENV)/bin/sweeper study report quickstart | grep '/report\.md$$')" && cat "$$report" && echo \
	  && echo "report: $$report (with its tables and plots)"
	@echo "MLflow UI: $(VENV)/bin/sweeper server   then open the link it prints for the study"

test: dev-install dataset
	$(PY) -m pytest -q

test-fast: dev-install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info

# The CPU-scale twins of the source studies (studies/cpu/), then their reports under docs/results/:
# a benchmark of about 1.5 hours on a 2-core CPU, not a test. FRESH=1 runs them from scratch.
reproduce: install dataset
	$(PY) tools/reproduce.py $(if $(FRESH),--fresh)
