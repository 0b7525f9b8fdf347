# Tests: pytest on CPU. PYTEST_ARGS passes options through (e.g. PYTEST_ARGS="-k kconfig").
# test is the whole suite (what CI runs); test-fast leaves out the tests marked slow
# (@pytest.mark.slow: real make and training subprocesses, 2-process groups), for local work.

.PHONY: test test-fast

## test: install the test dependencies and run the whole test suite (what CI runs)
test: $(DEV)
	$(PY) -m pytest $(PYTEST_ARGS) tests

## test-fast: the test suite without the tests marked slow (under 2 minutes on 2 cores)
test-fast: $(DEV)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests
