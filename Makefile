PYTHON ?= python

# The book's code (llms-from-scratch) is the reference in tests and benchmarks. Its
# declared requirements pull TensorFlow and JupyterLab, which it does not need for
# chapters 2-5, hence --no-deps.
# requirements.lock holds the versions of everything pip installs that were tested together, so
# that CI and a fresh clone get them, not whatever was released since; `make lock` renews it.
install:
	$(PYTHON) -m pip install -c requirements.lock -e '.[test]'
	$(PYTHON) -m pip install --no-deps 'llms-from-scratch==1.0.19'
	$(MAKE) plots-page PYTHON=$(PYTHON)

# `dvc plots show` with Vega, Vega-Lite and vega-embed from npm (vega/package-lock.json)
# inlined in its page, which then renders offline; DVC's default page loads them from a CDN.
plots-page:
	npm ci --prefix vega --no-audit --no-fund
	$(PYTHON) vega/make_template.py
	$(PYTHON) -m dvc config --local plots.html_template ../vega/plots-template.html

test:
	$(PYTHON) -m pytest

# The newest releases that pyproject.toml admits, resolved in a fresh virtualenv; run the
# tests on them (`make install test`) before committing the new requirements.lock. torch is
# left to pyproject.toml's torch==2.13.0, which a CUDA build (2.13.0+cu128) also satisfies.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -e '.[test]'
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^torch==' > requirements.lock
	rm -rf .lock-venv

# What CI reports on a pull request, made here: HEAD against BASE, both reproduced on the
# small params set .ci/params-small.yaml, into experiment-report/ (docs/experiments.md#ci).
BASE ?= main
experiment-report:
	$(PYTHON) -m gptpipe.ci_report --base $(BASE)

.PHONY: install plots-page test lock experiment-report
