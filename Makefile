# The two quick-start commands: `make run` and `make test`. Each builds .venv on
# first use. torch is installed first, pinned, so pip takes the local CPU wheel
# instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_MODEL := models/small

.PHONY: run test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/colocate serve --demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) models

# Regenerate the gRPC Python code in colocate/serving/proto_gen/ from proto/.
.PHONY: proto
proto: $(STAMP)
	$(PY) -m colocate.serving.proto_gen.build
