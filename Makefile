# Two commands do all the set-up on a fresh machine (see README):
#   make demo   creates .venv, installs the package, and captions the example images with the built-in demo model
#   make test   creates .venv, installs with the test extras (torch, transformers: the reference), runs pytest
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: test demo
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n logical --maxprocesses 4 --dist worksteal

demo: $(VENV)/.installed
	$(PY) -m llava_next_jax.demo
