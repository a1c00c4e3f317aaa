# The two commands of the README (`make demo`, `make test`) create or update the
# virtual environment from requirements.lock first, so they work on a fresh machine
# that has nothing but Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
LOCK := requirements.lock
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/pipeline
PYTEST_ARGS ?=
# pytest-xdist workers; each test file runs in one worker, so module fixtures are built once.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile

.PHONY: venv demo test test-all lint format bench-preprocess bench-quality bench-allpos bench-tune bench-compare bench-multi-interest bench-scann-sweep bench-defaults bench-input-pipeline bench-serving bench-serving-lowrank bench-serving-default bench-grpc-floor bench-merge bench-profile bench-load lock clean

venv: $(STAMP)

$(STAMP): $(LOCK) setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		--no-deps --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Main job on the embedded synthetic data set: the whole pipeline (generate, validate,
# preprocess, train dnc + sasrec, evaluate, bless, push), then serve and query over gRPC.
demo: venv
	$(BIN)/dnc pipeline run --root $(DEMO_DIR)

# Default test run (7.5-16 minutes on 2 cores with 2 workers, by host); long runs are marked `slow`.
test: venv
	$(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-preprocess: venv
	$(BIN)/python bench/preprocess.py

# Every variant on the synthetic set (about 30 minutes on 2 cores).
bench-quality: venv
	$(BIN)/dnc preprocess --source synthetic --output runs/bench-synthetic
	$(BIN)/python bench/quality.py --data runs/bench-synthetic --m 50,100 --epochs 5 \
		--out bench/results/quality-synthetic

# Issue 7: all-position vs per-prefix throughput, and sasrec vs dnc tuned on validation
# (synthetic; about 20 minutes on 2 cores). bench/tune.py --help for other data and grids.
bench-allpos: venv
	$(BIN)/dnc preprocess --source synthetic --output runs/bench-synthetic
	$(BIN)/python bench/allpos.py --data runs/bench-synthetic --out bench/results/allpos.json

bench-tune: venv
	$(BIN)/dnc preprocess --source synthetic --output runs/bench-synthetic
	$(BIN)/python bench/tune.py --data runs/bench-synthetic --grid bench/grids/synthetic-long.json \
		--m 50,100 --epochs 30 --out bench/results/tune-synthetic-30ep

# Issue 11: sasrec and dnc, 5 grid points each (bench/grids/issue11.json), selected on
# validation, on the real data sets in ../shared/data (about 10-15 minutes a run on
# Beauty/Toys, 5-12 on LastFM, 2 cores; several hours in all), the embedded synthetic set
# at M = 50, 100 (bench/grids/issue11-small.json: 3 points per variant, the default, the other
# width and the other loss, the points that moved on the real sets; about 8 minutes a run, the
# 1,000-step minimum is 50 epochs there), then the cross-data-set table.
SHARED_DATA ?= ../shared/data
bench-compare: venv
	for ds in lastfm:LastFM amazon-beauty:Beauty amazon-toys:Toys_and_Games; do \
		name=$${ds%%:*}; file=$${ds##*:}; \
		$(BIN)/dnc preprocess --source sequences --input $(SHARED_DATA)/$$name/$$file.txt \
			--output runs/$$name && \
		$(BIN)/python bench/compare.py --data runs/$$name --grid bench/grids/issue11.json \
			--variants sasrec,sasrec-mixed,dnc --out bench/results/compare-issue11-$$name || exit 1; \
	done
	$(BIN)/dnc preprocess --source synthetic --output runs/bench-synthetic
	$(BIN)/python bench/compare.py --data runs/bench-synthetic --grid bench/grids/issue11-small.json \
		--variants sasrec,sasrec-mixed,dnc --m 50,100 --out bench/results/compare-issue11-synthetic
	$(BIN)/python bench/summarize_compare.py --out bench/results/issue11-summary \
		--report "Amazon Beauty=bench/results/compare-issue11-amazon-beauty.json" \
		--report "Amazon Toys=bench/results/compare-issue11-amazon-toys.json" \
		--report "LastFM=bench/results/compare-issue11-lastfm.json" \
		--report "synthetic=bench/results/compare-issue11-synthetic.json" \
		--strongest "Amazon Beauty=sasrec d=100, 0.1225 / 0.1759 (this grid; before it 0.1177 / 0.1740)" \
		--strongest "Amazon Toys=sasrec default, 0.1251 / 0.1727 (this grid; before it 0.1154 / 0.1668)" \
		--strongest "LastFM=sasrec full softmax, 0.1101 / 0.1835 (this grid); at R@50 the sasrec default run 0.1009 / 0.1972 (runs-issue11-lastfm.md); before them 0.1000 / 0.1945" \
		--strongest "synthetic=sasrec full softmax, 0.8295 / 0.9005 at M = 50 / 100 (this grid, selected on validation); the highest sasrec test R@50 in it is d=100, 0.8410; before it 0.826 / 0.8935 (tune-synthetic-30ep.md)"

# Issue 12: mind and comirec-sa in their default regimes beside the earlier sasrec/dnc runs
# (docs/multi-interest.md), and the four default regimes' throughput in one run.
bench-multi-interest: venv
	for ds in lastfm:LastFM amazon-beauty:Beauty amazon-toys:Toys_and_Games; do \
		name=$${ds%%:*}; file=$${ds##*:}; \
		$(BIN)/dnc preprocess --source sequences --input $(SHARED_DATA)/$$name/$$file.txt \
			--output runs/$$name || exit 1; \
	done
	$(BIN)/python bench/compare.py --data runs/lastfm --epochs 100 --variants mind,comirec-sa \
		--include bench/results/compare-lastfm-100ep.json \
		--include bench/results/compare-lastfm-implied-100ep.json \
		--out bench/results/compare-lastfm-multi-interest
	$(BIN)/python bench/compare.py --data runs/amazon-beauty --epochs 20 --variants mind,comirec-sa \
		--include bench/results/compare-amazon-beauty-baselines.json \
		--include bench/results/compare-amazon-beauty-implied.json \
		--out bench/results/compare-amazon-beauty-multi-interest
	$(BIN)/python bench/compare.py --data runs/amazon-toys --epochs 20 --variants mind,comirec-sa \
		--include bench/results/compare-amazon-toys.json \
		--include bench/results/compare-amazon-toys-implied.json \
		--out bench/results/compare-amazon-toys-multi-interest
	$(BIN)/dnc preprocess --source synthetic --output runs/bench-synthetic
	$(BIN)/python bench/compare.py --data runs/bench-synthetic --epochs 20 --m 50,100 \
		--variants sasrec,dnc,mind,comirec-sa --out bench/results/compare-synthetic-multi-interest
	$(BIN)/dnc preprocess --source synthetic --synthetic-users 6040 --synthetic-items 3706 \
		--synthetic-mean-length 165 --output runs/synthetic-ml1m
	$(BIN)/python bench/defaults.py --data runs/synthetic-ml1m --variants sasrec,dnc,mind,comirec-sa \
		--no-convergence --out bench/results/throughput-multi-interest-ml1m

# Issue 14: ScaNN recall vs latency per cluster (leaves searched x re-scored candidates).
bench-scann-sweep: venv
	$(BIN)/python bench/scann_sweep.py --items 1000000 --out bench/results/scann-sweep

bench-defaults: venv
	$(BIN)/dnc preprocess --source synthetic --synthetic-users 6040 --synthetic-items 3706 \
		--synthetic-mean-length 165 --output runs/synthetic-ml1m
	$(BIN)/python bench/defaults.py --data runs/synthetic-ml1m --convergence-variants dnc \
		--out bench/results/defaults-ml1m-issue11-windows

# Issue 11: what the all-position input pipeline costs a step, before and after section 23.
bench-input-pipeline: venv
	$(BIN)/dnc preprocess --source synthetic --synthetic-users 6040 --synthetic-items 3706 \
		--synthetic-mean-length 165 --output runs/synthetic-ml1m
	$(BIN)/dnc preprocess --source sequences --input ../shared/data/amazon-beauty/Beauty.txt \
		--output runs/beauty
	$(BIN)/python bench/input_pipeline.py --data runs/synthetic-ml1m --data runs/beauty \
		--out bench/results/input-pipeline

bench-serving: venv
	$(BIN)/python bench/serving.py

# Issue 14's targets on the low-rank set: 100K and 1M items, one request at a time, 8 and 32
# concurrent clients (bench/results/serving-lowrank-clients.md).
bench-serving-lowrank: venv
	$(BIN)/python bench/serving.py --latent-dim 8 --concurrency 8,32 --no-fixed-k-reference \
		--out bench/results/serving-lowrank-clients

# The same at 1M items for the export `dnc` ships where validation selects the score merge at
# prompt weight 0: one global index.
bench-serving-default: venv
	$(BIN)/python bench/serving.py --sizes 1000000 --latent-dim 8 --concurrency 8,32 \
		--merge score --prompt-weight 0 --no-fixed-k-reference --phase-seconds 60 \
		--out bench/results/serving-lowrank-clients-1m-score-w0

# What each merge (quota; score at prompt weights 1, 0.25, 0) costs a request at 1M items.
bench-merge: venv
	$(BIN)/python bench/merge_latency.py --size 1000000 --latent-dim 8 \
		--out bench/results/serving-merge-1m

# The fixed cost of one gRPC request: a trivial model through the server, a bare gRPC echo.
bench-grpc-floor: venv
	$(BIN)/python bench/grpc_floor.py --out bench/results/grpc-floor

# One request at 1M items split into its stages (gRPC protos, vocabulary, tower, each index
# search, exclusion, merge), ScaNN and brute force.
bench-profile: venv
	$(BIN)/python bench/request_profile.py --size 1000000 --latent-dim 8 \
		--out bench/results/serving-profile-1m

# The server under load and faults, loopback only: the soak (32 clients, 20,000 requests,
# three versions pushed during the run, one corrupt) and SIGKILL + restart mid-load. Uses
# the model of `make demo` when there is one, else a synthetic model (bench/load.py).
LOAD_MODEL ?= $(wildcard $(DEMO_DIR)/serving/dnc)
LOAD_ARGS ?= $(if $(LOAD_MODEL),--model-template $(LOAD_MODEL))
bench-load: venv
	$(BIN)/python bench/load.py --scenario soak $(LOAD_ARGS) --out bench/results/load-soak
	$(BIN)/python bench/load.py --scenario kill $(LOAD_ARGS) --out bench/results/load-kill

# Re-resolve requirements.in into requirements.lock (needs the network to PyPI).
lock:
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv
	.venv-lock/bin/uv pip compile requirements.in --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -o $(LOCK)

clean:
	rm -rf $(VENV) .venv-lock runs .pytest_cache
