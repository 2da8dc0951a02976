PYTHON ?= python

# The book's code (llms-from-scratch) is the reference in tests and benchmarks. Its
# declared requirements pull TensorFlow and JupyterLab, which it does not need for
# chapters 2-5, hence --no-deps.
install:
	$(PYTHON) -m pip install -e '.[test]'
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

# What CI reports on a pull request, made here: HEAD against BASE, both reproduced on the
# small params set .ci/params-small.yaml, into experiment-report/ (docs/experiments.md#ci).
BASE ?= main
experiment-report:
	$(PYTHON) -m gptpipe.ci_report --base $(BASE)

.PHONY: install plots-page test experiment-report
