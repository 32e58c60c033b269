PY ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python

.PHONY: install install-dev demo test test-slow bench report-screenshot clean

$(VENV)/bin/python:
	$(shell command -v $(PY) || echo python3) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: requirements.txt $(VENV)/bin/python
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(PIP) install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PYTHON) -m pipeline.run --input 'configs/demo/*.jsonl' --output out/demo --model configs/models/demo.yaml --overwrite
	$(PYTHON) -m pipeline.run --input 'configs/demo/labeling/*.jsonl' --output out/demo-labeling \
		--model configs/models/demo.yaml --overwrite
	head -n 3 out/demo-labeling/labels-00000.jsonl

# The README's picture of the run report: the demo's report in headless Chromium (Debian's package).
report-screenshot: demo
	chromium --headless --no-sandbox --hide-scrollbars --window-size=1000,2400 \
		--screenshot=$(CURDIR)/docs/report.png file://$(CURDIR)/out/demo/_report.html

# Two workers (pytest-xdist), a test file to each at a time: the CI machine's two cores, where one
# pytest process keeps about one busy (most of a test is tracing and compiling).
TEST_WORKERS ?= -n 2 --dist loadfile

test: install-dev
	$(PYTHON) -m pytest -q $(TEST_WORKERS)

test-slow: install-dev
	$(PYTHON) -m pytest -q -m slow $(TEST_WORKERS)

bench: install-dev
	$(PYTHON) -m launch.bench_engine

clean:
	rm -rf $(VENV) .pytest_cache .jax_cache
