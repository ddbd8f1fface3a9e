# fedcare: `make demo` runs a whole simulated study; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test bench install clean images test-images

$(STAMP): pyproject.toml requirements.lock requirements-reference.lock
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU build lies on this machine kind's disk
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	# the test-only NLP reference (medspacy), exact pins without resolution: see requirements-reference.lock
	$(BIN)/pip install --quiet --no-deps -r requirements-reference.lock
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fedcare simulate --out runs/demo
	@echo "demo report: $(CURDIR)/runs/demo/report.json (summary: runs/demo/summary.txt)"

# two workers (pytest-xdist): the deployment tests wait on real processes much of the time
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/dp_training.py
	$(BIN)/python bench/round_time.py
	$(BIN)/python bench/noise.py
	$(BIN)/python bench/plan_sigma.py
	$(BIN)/python bench/strategies.py --repeats 2
	test -d runs/bench-breast-cancer-sites || $(BIN)/fedcare example breast-cancer --out runs/bench-breast-cancer-sites
	$(BIN)/python bench/strategies.py --repeats 2 --sites runs/bench-breast-cancer-sites --study studies/breast-cancer.toml --epsilon 1
	$(BIN)/pip install -q -c requirements.lock -e '.[bench]'  # fhir.resources, the ingest baseline
	$(BIN)/python bench/fhir_ingest.py
	$(BIN)/python bench/omop_ingest.py  # PostgreSQL (Debian postgresql), pandas from [bench]

# OCI images of the three roles (podman, base from Debian via mmdebstrap; cached in ~/.cache/fedcare/images)
images: $(STAMP)
	PYTHON=$(BIN)/python deploy/images/build.sh

# builds them (reusing the caches) and smoke-tests them from the mounted images (root: mount, chroot)
test-images: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_images.py

clean:
	rm -rf $(VENV) runs .pytest_cache
