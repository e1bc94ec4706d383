# rollout: the two commands a newcomer needs are `make run` and `make test`.
# Build outputs go to a cache outside the clone so repeated runs (and CI) reuse them.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/rollout/target
export CARGO_TERM_COLOR ?= never
CARGO ?= cargo
ROLLOUT = $(CARGO_TARGET_DIR)/debug/rollout

.PHONY: run test smoke crash-test redelivery dashboard-test example-rl preflight build fmt fmt-check clippy sans-io no-openssl release-deps unit bench bench-e2e bench-storage bench-sim bench-recovery bench-submit bench-compare bench-heartbeats sim-soak fuzz fuzz-seeds

## run: build, print the plan, then run a local cluster (coordinator + 2 workers over mTLS) through a demo job;
## prints where /metrics is served; KEEP=1 keeps the cluster running after the demo until Ctrl-C
run: build
	$(ROLLOUT) plan $(if $(CONFIG),--config $(CONFIG))
	ROLLOUT=$(ROLLOUT) KEEP=$(KEEP) scripts/run-local.sh

## test: formatting, lints and every test of the workspace
test: fmt-check clippy sans-io no-openssl release-deps unit

## smoke: the real binaries end to end: 1 coordinator + 2 workers with a Rust cdylib and a
## Python sidecar plugin; kills w1 and checks it is declared failed at once (its connection
## closed) and every task completes exactly once (scripts/smoke.sh; a temp dir, not ./data);
## then the crash test below; then six 1 MB payloads and results through one six-slot worker
## (scripts/big-payloads.sh); then the redelivery measurement and the browser test below
smoke: preflight build
	ROLLOUT=$(ROLLOUT) scripts/smoke.sh
	ROLLOUT=$(ROLLOUT) scripts/coordinator-crash.sh
	ROLLOUT=$(ROLLOUT) scripts/big-payloads.sh
	ROLLOUT=$(ROLLOUT) scripts/redelivery.sh
	ROLLOUT=$(ROLLOUT) scripts/dashboard-test.sh
	ROLLOUT=$(ROLLOUT) scripts/example-rl.sh

## example-rl: the RL example: a CartPole policy improved by an evolution strategy whose episodes
## run as tasks on a local cluster of two workers (a Python sidecar plugin); writes the learning
## curve to ./data/rl/learning_curve.png (examples/rl/, scripts/example-rl.sh; part of make smoke)
example-rl: build
	ROLLOUT=$(ROLLOUT) scripts/example-rl.sh

## dashboard-test: the coordinator's dashboard in headless Chromium (Selenium + chromedriver; installs
## Debian's chromium and chromium-driver if missing and root): both workers shown, a job at 100%,
## a killed worker shown failed; screenshot in $(CARGO_TARGET_DIR)/dashboard-test/ (scripts/dashboard-test.sh)
dashboard-test: build
	ROLLOUT=$(ROLLOUT) scripts/dashboard-test.sh

## redelivery: kill -9 a worker running tasks (ROUNDS, default 5) and print how long until it is
## declared failed and its tasks are leased to the other worker (median, worst; target 50 ms;
## fails past LIMIT_MS, default 1000) (scripts/redelivery.sh; about 6 s after the build)
redelivery: build
	ROLLOUT=$(ROLLOUT) scripts/redelivery.sh

## crash-test: kill -9 the coordinator of a real cluster under load (twice) and restart it on the
## same data dir; every acknowledged job survives and each task is committed exactly once
## across all its histories (scripts/coordinator-crash.sh; a temp dir, about 6 s after the build)
crash-test: build
	ROLLOUT=$(ROLLOUT) scripts/coordinator-crash.sh

## preflight: cargo, make, a C linker and python3 >= 3.11 are there (protoc is not needed)
preflight:
	scripts/preflight.sh

build:
	$(CARGO) build --workspace --locked

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all --check

## sans-io: the state machines read no clock, spawn nothing and pull in no runtime
sans-io:
	scripts/check-sans-io.sh

## no-openssl: TLS is rustls + ring only; fails if OpenSSL or native-tls enters the dependency graph
no-openssl:
	scripts/check-no-openssl.sh

## release-deps: turmoil and tokio's test-util (the simulator's layer 2) stay out of the `rollout` binary
release-deps:
	scripts/check-release-deps.sh

clippy:
	$(CARGO) clippy --workspace --all-targets --all-features --locked -- -D warnings

unit:
	$(CARGO) test --workspace --all-features --locked

## bench: every benchmark (release builds; minutes, not part of `make test`)
bench: bench-e2e bench-storage bench-sim bench-recovery

## bench-e2e: end-to-end no-op tasks/s through 1 coordinator + 2 workers over loopback mTLS with
## fsync'd redb, and submit-to-start p50/p99 at half that load (BENCH_TASKS, BENCH_RUNS, ...: see
## system/transport/benches/e2e.rs)
bench-e2e:
	$(CARGO) bench -p rollout-transport --bench e2e

## bench-heartbeats: BENCH_WORKERS (10,000) workers, each with its own certificate and connection,
## beating every 500 ms against the real release binaries while `rollout submit` loops push echo
## tasks: beats/s, beat round trip p50/p99, tasks/s against the same run's baseline without beats
## (system/transport/benches/heartbeats.rs; about 2 minutes)
bench-heartbeats:
	$(CARGO) build --release --locked -p rollout-cli
	ROLLOUT=$(CARGO_TARGET_DIR)/release/rollout $(CARGO) bench -p rollout-transport --bench heartbeats

## bench-storage: committed single-put transactions/s vs puts/s batched 1000 per transaction (file backend)
bench-storage:
	$(CARGO) bench -p rollout-storage --bench storage

## bench-recovery: coordinator restart with BENCH_TASKS (1,000,000) tasks stored (time to accepting work,
## peak RSS, against a full read of the same database) and status latency with BENCH_JOBS (100,000)
## finished jobs (against one finished job), each in a fresh process
bench-recovery:
	$(CARGO) bench -p rollout-coordinator --bench scale

## bench-submit: `rollout submit` of BENCH_TASKS (1,000,000) tasks through the real release binaries:
## client and coordinator peak RSS against the file's size, tasks/s (scripts/bench-submit.sh)
bench-submit:
	$(CARGO) build --release -p rollout-cli --locked
	ROLLOUT=$(CARGO_TARGET_DIR)/release/rollout scripts/bench-submit.sh

## bench-compare: the same no-op workload through Redis Streams (appendfsync always, Rust client) and
## rollout's real binaries, alternating, BENCH_RUNS (3) each: medians, the ratio, the fsync baseline
## (installs Debian's redis-server if missing; scripts/bench-compare.sh)
bench-compare:
	$(CARGO) build --release -p rollout-cli -p redis-streams-bench --locked
	scripts/bench-compare.sh

## bench-sim: simulated seconds per wall second (1 coordinator + 16 workers) and swarm seeds per minute
bench-sim:
	$(CARGO) bench -p sim --bench sim

## fuzz: every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 180) each, nightly toolchain,
## memory and time bounded per input; the corpora in fuzz/corpus also run on stable in make test
FUZZ_SECONDS ?= 180
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

## fuzz-seeds: rewrite the seed inputs of fuzz/corpus/ from real messages (rollout_fuzz::seeds)
fuzz-seeds:
	$(CARGO) test -p rollout-fuzz --test corpus -- --ignored write_seed_corpus

## sim-soak: every scenario over SEEDS seeds (default 500) in a release build; prints any failing seed's repro command
SEEDS ?= 500
sim-soak:
	$(CARGO) build --release -p sim --locked
	@fail=0; for f in scenarios/*.toml; do \
		$(CARGO_TARGET_DIR)/release/sim explore "$$f" --seeds $(SEEDS) | tail -n 12 || fail=1; \
	done; exit $$fail
