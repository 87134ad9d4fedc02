# Two commands do everything on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision come from the local wheel cache here; pyproject only sets ranges.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow lint docs venv bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# pip byte-compiles one file at a time; compileall uses every core (49 s instead of about
# 110 s here). The modules must be compiled at install: where PYTHONDONTWRITEBYTECODE is set,
# every process would compile torch again. A few files of some packages are not Python 3
# and fail to compile, as they do under pip, which skips them too.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile $(TORCH_PKGS) || $(BIN)/pip install -q --no-compile torch torchvision
	$(BIN)/pip install -q --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/amp run

test: venv
	$(BIN)/ruff check amp_plugin cli integration_tests examples
	$(BIN)/lint-imports
	$(MAKE) docs
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist worksteal integration_tests

# Tests of minutes each (SIGKILL twice in every stage, ...), left out of `make test`.
test-slow: venv
	$(BIN)/python -m pytest -q -m slow integration_tests

lint: venv
	$(BIN)/ruff check amp_plugin cli integration_tests examples
	$(BIN)/lint-imports

# The manual (mkdocs.yml, docs/) into build/site; --strict: a broken link, anchor or API name fails.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: venv
	$(BIN)/amp bench search
	$(BIN)/amp bench throughput

clean:
	rm -rf runs .cache build/site
