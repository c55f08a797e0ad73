# selfsup3d: every target sets itself up; a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-slow lint format bench clean

install: $(STAMP)

# Editable install with the tested pins; re-runs when the dependency files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The fast CPU suite (CI runs exactly this). Slow tests are marked and left to `make test-slow`.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS) || test $$? -eq 5  # 5: none is marked slow at the moment

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Benchmarks print figures (throughput, memory); they are not tests and take minutes.
bench: $(STAMP)
	@set -e; for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script; done

# The masked-view (RayZer) demo on a 2-core CPU, about 4 minutes: renders the embedded data set into
# data/embedded unless it is there (shared with the other demos), trains configs/demo/masked_view.yaml,
# then evaluates the run's last checkpoint on the held-out objects and prints the figures.
DEMO_DATA ?= data/embedded
DEMO_RUN  ?= runs/demo_masked_view
DEMO_ARGS ?= --data.init_args.train_urls '$(DEMO_DATA)/train-*.tar' --data.init_args.val_urls '$(DEMO_DATA)/val-*.tar' \
	--trainer.default_root_dir $(DEMO_RUN)
.PHONY: demo
demo: $(STAMP)
	@test -f $(DEMO_DATA)/info.json || $(BIN)/selfsup3d data render --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN)  # a fresh run each time: its checkpoints are lightning_logs/version_0/checkpoints/
	$(BIN)/selfsup3d fit --config configs/demo/masked_view.yaml $(DEMO_ARGS)
	$(BIN)/selfsup3d validate --config configs/demo/masked_view.yaml $(DEMO_ARGS) --ckpt_path last

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
