# blkmirror — the README's two commands are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: all build release demo test sim bench-nbd bench-repl bench-wan torture many-volumes acceptance-overflow clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# A primary and a mirror on this machine: certificates, writes through real NBD clients, live
# status with lag, then a byte-for-byte check of the mirror. It first sets up what it needs
# (tools/setup.sh), then builds.
demo:
	CARGO="$(CARGO)" bash tools/demo.sh

# Everything CI runs: formatting, lints (with and without the test hooks), unit tests, the
# simulator's schedules and the end-to-end tests with real clients. Tests need the test-only
# hooks (fault injection, planted bugs); release builds never have them.
test:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features test-hooks -- -D warnings
	/usr/bin/python3 tools/test_tools.py
	$(CARGO) test --features test-hooks
	$(CARGO) build --features test-hooks
	bash tools/ocf_test.sh "$${CARGO_TARGET_DIR:-target}/debug/blkmirror"

# The deterministic simulator: SEEDS random schedules (default 15000, about 5 minutes on 2 cores), or one
# replayed exactly with BLKMIRROR_SIM_SEED=S. Last line: `N schedules, V violations`.
sim:
	$(CARGO) run --quiet --release --features test-hooks --bin blkmirror-sim

# More kill -9 rounds of the mirror than `make test` runs (BLKMIRROR_TORTURE_ROUNDS, default 100).
torture:
	BLKMIRROR_TORTURE_ROUNDS=$${BLKMIRROR_TORTURE_ROUNDS:-100} $(CARGO) test --release --features test-hooks --test replication -- --nocapture mirror_kill9

# 128 volumes written at once (fio, 64 KiB random, QD4): exit 0 when no stream stalled or
# reconnected and every lag drained (tools/many_volumes.py; ~12 GiB of RAM).
many-volumes: release
	/usr/bin/python3 tools/many_volumes.py $(MANY_VOLUMES_ARGS)

# Issue 14's acceptance at full scale: 2 GiB written through NBD past a 128 MiB journal with the
# mirror away, then kill -9 rounds during the resync (tools/overflow_acceptance.py; ~8 GiB of disk).
acceptance-overflow: release
	/usr/bin/python3 tools/overflow_acceptance.py $(ACCEPTANCE_OVERFLOW_ARGS)

# fio over NBD: blkmirror against qemu-nbd, alternating; writes target/bench/nbd.json.
bench-nbd: release
	bash benches/nbd.sh

# fio over NBD: blkmirror replicating to a local mirror against qemu-nbd; lag p50/p99, RSS;
# writes target/bench/repl.json.
bench-repl: release
	/usr/bin/python3 benches/repl.py

# blkmirror over tools/wan-sim (RTT 20 ms, loss 0.1 %) beside iperf3 TCP and nbdcopy; bulk,
# steady-load RPO, a 30 s outage, and the same outage overflowing a 64 MiB journal (dirty-map
# resync); writes target/bench/wan.json and wan.svg. Needs root.
bench-wan: release
	/usr/bin/python3 benches/wan.py

clean:
	$(CARGO) clean
