# Two commands on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out
export TQDM_MININTERVAL ?= 2

.PHONY: install demo test bench lint clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)                      # the CPU wheel on disk, never a CUDA build
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/calofm demo --out $(DEMO)

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) scripts/bench_synthetic.py
	$(PY) scripts/bench_sampling.py
	$(PY) scripts/bench_training.py

lint: $(STAMP)
	$(VENV)/bin/ruff check calofm tests scripts

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
