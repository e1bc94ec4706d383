# rollout: the two commands a newcomer needs are `make run` and `make test`.
# Build outputs go to a cache outside the clone so repeated runs (and CI) reuse them.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/rollout/target
export CARGO_TERM_COLOR ?= never
CARGO ?= cargo
ROLLOUT = $(CARGO_TARGET_DIR)/debug/rollout

.PHONY: run test build fmt fmt-check clippy sans-io unit bench-storage

## run: build, then print the validated plan of the local cluster (CONFIG=file.toml to use your own)
run: build
	$(ROLLOUT) plan $(if $(CONFIG),--config $(CONFIG))

## test: formatting, lints and every test of the workspace
test: fmt-check clippy sans-io unit

build:
	$(CARGO) build --workspace --locked

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all --check

## sans-io: the state machines read no clock, spawn nothing and pull in no runtime
sans-io:
	scripts/check-sans-io.sh

clippy:
	$(CARGO) clippy --workspace --all-targets --all-features --locked -- -D warnings

unit:
	$(CARGO) test --workspace --all-features --locked

## bench-storage: committed single-put transactions/s vs puts/s batched 1000 per transaction (file backend)
bench-storage:
	$(CARGO) bench -p rollout-storage --bench storage
