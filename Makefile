# selfsup3d: every target sets itself up; a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
ORBIT_DATA ?= data/orbit

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

# Benchmarks print figures (throughput, memory); they are not tests and take minutes on the CPU (no GPU needed).
# bench/reprojection_fit.py reads the orbit data (rendered first when missing). The cameras' curve trains for long
# (bench-cameras, up to an hour on 2 cores), so it has its own target.
bench: $(STAMP) $(ORBIT_DATA)/info.json
	@set -e; for script in bench/*.py; do test $$script = bench/cameras.py && continue; echo "== $$script"; $(BIN)/python $$script; done

.PHONY: bench-cameras
bench-cameras: $(STAMP) $(ORBIT_DATA)/info.json
	$(BIN)/python bench/cameras.py $(BENCH_CAMERAS_ARGS) -- --data.init_args.train_urls '$(ORBIT_DATA)/train-*.tar' \
		--data.init_args.val_urls '$(ORBIT_DATA)/val-*.tar'

# The masked-view (RayZer) demo on a 2-core CPU: renders the orbit data set into data/orbit unless it is
# there (24 views per scene in trajectory order along a 180-degree arc, for the view-overlap curriculum;
# under a minute), trains configs/demo/masked_view.yaml, then evaluates the run's last checkpoint on the
# held-out objects and prints the figures (render, aligned cameras, RayZer pose probe).
DEMO_DATA ?= $(ORBIT_DATA)
DEMO_RUN  ?= runs/demo_masked_view
DEMO_ARGS ?= --data.init_args.train_urls '$(DEMO_DATA)/train-*.tar' --data.init_args.val_urls '$(DEMO_DATA)/val-*.tar' \
	--trainer.default_root_dir $(DEMO_RUN)
$(ORBIT_DATA)/info.json:
	$(BIN)/selfsup3d data render --out $(ORBIT_DATA) --views 24 --trajectory orbit --arc 180
.PHONY: demo
demo: $(STAMP) $(DEMO_DATA)/info.json
	rm -rf $(DEMO_RUN)  # a fresh run each time: its checkpoints are lightning_logs/version_0/checkpoints/
	$(BIN)/selfsup3d fit --config configs/demo/masked_view.yaml $(DEMO_ARGS)
	$(BIN)/selfsup3d validate --config configs/demo/masked_view.yaml $(DEMO_ARGS) --ckpt_path last

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
