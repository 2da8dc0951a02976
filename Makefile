PYTHON ?= python

# The book's code (llms-from-scratch) is the reference in tests and benchmarks. Its
# declared requirements pull TensorFlow and JupyterLab, which it does not need for
# chapters 2-5, hence --no-deps.
install:
	$(PYTHON) -m pip install -e '.[test]'
	$(PYTHON) -m pip install --no-deps 'llms-from-scratch==1.0.19'

test:
	$(PYTHON) -m pytest

.PHONY: install test
