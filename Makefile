# keyshard: `make test` (what CI runs) and `make demo`. Both install what they need first.
SHELL := /bin/bash
CARGO ?= cargo

# Debian packages the tests and the demo need beyond the Rust toolchain. Filled in as the
# parts that need them (QEMU, swtpm, cryptsetup, ...) land.
SYSTEM_PACKAGES :=

FUZZ_SECONDS ?= 600

.PHONY: test demo deps lint unit bench fuzz

deps:
	@scripts/ensure-packages.sh $(SYSTEM_PACKAGES)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

test: deps lint unit

demo: deps
	$(CARGO) build --release --bin keyshard
	scripts/demo.sh target/release/keyshard

bench:
	$(CARGO) bench -p keyshard-core --bench sharing

# Fuzz a parser of untrusted bytes (nightly and cargo-fuzz; cargo-fuzz is installed when
# missing): `make fuzz FUZZ_TARGET=descriptor_chain`. Targets: fragment_parse, descriptor_chain.
FUZZ_TARGET ?= fragment_parse
FUZZ_MAX_LEN_fragment_parse := 1400
FUZZ_MAX_LEN_descriptor_chain := 16384
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p fuzz/corpus/$(FUZZ_TARGET)
	cd fuzz && $(CARGO) +nightly fuzz run $(FUZZ_TARGET) corpus/$(FUZZ_TARGET) seeds/$(FUZZ_TARGET) -- \
		-max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN_$(FUZZ_TARGET))
