# The README's two commands: `make demo` (main job on the embedded local store) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test install dev-install dataset clean

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

demo: install dataset
	$(VENV)/bin/sweeper train configs/quick.yaml

test: dev-install dataset
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
