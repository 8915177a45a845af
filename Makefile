# Tether — the two commands of the quick start are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: demo test test-slow faults venv proto clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the local CPU build first, so that nothing later pulls CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(if $(wildcard /opt/wheels),--find-links /opt/wheels) torch==2.13.0
	$(BIN)/pip install -q -e '.[learner,sim,dds,dev,scale]'
	touch $(STAMP)

venv: $(STAMP)

# The main job: a learner and a simulated fleet on loopback, on the embedded defaults.
demo: $(STAMP)
	$(BIN)/tether fleet --robots 4 --minutes 3 --out runs/demo

# The whole pytest suite (end-to-end fleet test included).
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The fault-injection suite at its full sizes (tests/faults/report.py), then faults.json and the
# README table from the rows the tests wrote. Plain `make test` runs it at the CI sizes.
faults: $(STAMP)
	rm -f runs/faults/rows.jsonl
	TETHER_FAULTS=full $(BIN)/python -m pytest -q tests/faults
	$(BIN)/python -m tests.faults.collect --out faults.json

# Regenerate the checked-in wire code from the single schema.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I tether/wire --python_out=tether/wire --grpc_python_out=tether/wire tether/wire/tether.proto
	sed -i 's/^import tether_pb2 as/from . import tether_pb2 as/' tether/wire/tether_pb2_grpc.py

clean:
	rm -rf $(VENV) runs .tether-cache
