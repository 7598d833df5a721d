# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTO_SRC := protos/federation/_proto/v1/node.proto

.PHONY: install demo test lint typecheck pytest protos bench bench-training bench-flower notebook clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: on these machines torch==2.13.0 is a CPU build on local disk;
	# letting pip resolve `torch>=2.2` itself would download several GB of CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/federation demo

lint: install
	$(BIN)/ruff check federation nodes tests benchmarks notebooks/build.py
	$(BIN)/ruff format --check federation nodes tests benchmarks notebooks/build.py

typecheck: install
	$(BIN)/mypy federation nodes

pytest: install
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

protos: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
	    --pyi_out=. $(PROTO_SRC)

# JupyterLab on notebooks/ (the `notebook` extra is installed here only, not by `make test`).
NOTEBOOK_STAMP := $(VENV)/.notebook-stamp
$(NOTEBOOK_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,notebook]'
	touch $(NOTEBOOK_STAMP)

notebook: $(NOTEBOOK_STAMP)
	$(BIN)/jupyter lab notebooks/

bench: install
	$(BIN)/python benchmarks/analytics.py

# Federated training rounds from 1M to 550M parameters (minutes; several GB of memory).
bench-training: install
	$(BIN)/python benchmarks/training.py

# The 100M x 2 round next to Flower 1.42's on this machine, in the same run. Flower gets its
# own venv: it pins its own gRPC and protobuf. torch first, as above.
FLOWER := .venv-flower
$(FLOWER)/.installed-stamp:
	test -x $(FLOWER)/bin/python || $(PYTHON) -m venv $(FLOWER)
	$(FLOWER)/bin/python -m pip install -q --upgrade pip
	$(FLOWER)/bin/python -m pip install -q torch==2.13.0
	$(FLOWER)/bin/python -m pip install -q flwr==1.42.0
	touch $@

bench-flower: install $(FLOWER)/.installed-stamp
	$(BIN)/python benchmarks/training.py --sizes 100M --no-sweep --rounds 4 \
	    --flower $(FLOWER)/bin/python

clean:
	rm -rf $(VENV) $(FLOWER) demo-state bench-data .pytest_cache .mypy_cache .ruff_cache
