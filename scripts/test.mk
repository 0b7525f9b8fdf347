# Tests: pytest on CPU. PYTEST_ARGS passes options through (e.g. PYTEST_ARGS="-k kconfig").

.PHONY: test

## test: install the test dependencies and run the test suite
test: $(DEV)
	$(PY) -m pytest $(PYTEST_ARGS) tests
