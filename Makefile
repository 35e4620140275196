# blkmirror — the README's two commands are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: all build release demo test unit lint bench-nbd clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# Serve a sparse volume, write to it with real NBD clients, show the result.
demo: release
	bash tools/demo.sh

# Everything CI runs: formatting, lints, unit tests and the end-to-end tests with real clients.
test:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test

# fio over NBD: blkmirror against qemu-nbd, alternating; writes target/bench/nbd.json.
bench-nbd: release
	bash benches/nbd.sh

clean:
	$(CARGO) clean
