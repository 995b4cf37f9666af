# darkslim: `make demo` runs the whole pipeline on the embedded demo data; `make test` runs the test suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: demo test bench clean-venv

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VPY) -m pytest -q

demo: $(VENV)/.installed
	$(VPY) demo.py

bench: $(VENV)/.installed
	$(VPY) -m bench.run_all

clean-venv:
	rm -rf $(VENV)
