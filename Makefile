# keyshard: `make test` (what CI runs) and `make demo`. Both install what they need first.
SHELL := /bin/bash
CARGO ?= cargo

# Debian packages the tests and the demo need beyond the Rust toolchain, from the stock
# bookworm sources. The end-to-end boot (images/, qemu-configs/, tests/) needs:
#   qemu-system-x86          QEMU 7.2 (its qemu-system-common also ships qemu-storage-daemon)
#   linux-image-cloud-amd64  the guest kernel and the modules the initramfs takes
#   busybox-static cryptsetup-bin cpio e2fsprogs   the initramfs and the LUKS2 test volume
#   qemu-utils               qemu-img; see `deps` for why it is listed
#   libtss2-dev pkg-config   tpm2-tss for tss-esapi (with its swtpm TCTI)
#   swtpm                    the software TPM the TPM tests and the demo run against
#   swtpm-tools              swtpm_setup and swtpm_localca: TPMs with EK certificates from a
#                            local CA, for the enrolment tests (MakeCredential/ActivateCredential)
#   tpm2-tools               tpm2_pcrextend/tpm2_pcrread: the e2e test and the demo change the
#                            (software) host TPM's PCR 7 to show the coordinator refusing
#   libvirt-clients libxml2-utils   virt-xml-validate (which runs xmllint) and virsh's test
#                            driver: `check-configs` validates and defines the libvirt domain
#   etcd-server              etcd 3.4: the credential service's store tests run against a real
#                            etcd on loopback (keyshard-cms/tests/store_suite.rs)
#   protobuf-compiler        protoc, which the etcd-client crate's build script runs
#   curl                     the credential service's tests call it over TLS as a user would
#                            (keyshard/tests/cms.rs)
#   etcd-client              etcdctl: the lab harness dumps the etcd store with it and searches
#                            the dump for plaintext shares (keyshard/tests/lab.rs)
#   jq                       the demo's multi-host part reads the lab's lab.json with it
#                            (scripts/demo-hosts.sh)
SYSTEM_PACKAGES := qemu-system-x86 qemu-utils linux-image-cloud-amd64 busybox-static \
	cryptsetup-bin cpio e2fsprogs libtss2-dev pkg-config swtpm swtpm-tools tpm2-tools \
	libvirt-clients libxml2-utils etcd-server protobuf-compiler curl etcd-client jq

FUZZ_SECONDS ?= 600

.PHONY: test demo deps lint unit check-deps check-configs check-fuzz bench bench-devices bench-release \
	bench-storm bench-fetch fuzz e2e \
	e2e-bins guest-static images

# Twice on purpose: where a newer qemu-utils is preinstalled (bookworm-backports), it breaks
# bookworm's qemu-system-common, so the first pass replaces it and the second puts qemu-utils
# back at the matching version. When everything is installed both passes do nothing.
deps:
	@scripts/ensure-packages.sh $(SYSTEM_PACKAGES)
	@scripts/ensure-packages.sh $(SYSTEM_PACKAGES)

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: deps
	$(CARGO) test --workspace

test: deps lint check-deps unit check-configs check-fuzz e2e

# The crates keep what they hold: no tss-esapi (libtss2) in the trees of vhost-keyshard,
# guest-driver and keyshard-attest, and no sev or aws-lc-rs in what vhost-keyshard ships
# (`cargo tree`; the rules and why the whole tree is searched are in the script).
check-deps:
	CARGO="$(CARGO)" scripts/check-crate-deps.sh

# The VMM configurations no test boots: the libvirt domain validated (virt-xml-validate) and
# defined on libvirt's test driver, as shipped and with iommu='on'; cloud-hypervisor.sh's dry run
# checked against cloud-hypervisor's documented options (it is not packaged in bookworm).
check-configs: deps
	qemu-configs/check-configs.sh

# The fuzz targets still compile, so they cannot rot between `make fuzz` runs. `cargo check` on
# the default (stable) toolchain: the targets need nightly and cargo-fuzz only to run with
# sanitizer coverage, not to type-check, and a fresh machine may have no nightly. The workspace's
# target directory is shared, so only the fuzz crate itself is checked again (under a second
# once warm). It does not link, so a link-only failure would show only in `make fuzz`.
check-fuzz:
	$(CARGO) check --manifest-path fuzz/Cargo.toml --bins

# End-to-end tests under QEMU (TCG unless KEYSHARD_ACCEL=kvm): tests/tests/boot.rs,
# tests/tests/tpm.rs and tests/tests/access_platform.rs (every virtio device with
# iommu_platform=on), marked #[ignore] so `unit` skips them. Each test deals a key (boot.rs:
# `keyshard split`; tpm.rs: `keyshard init --policy examples/vhd-tpm.toml` against its own swtpm),
# starts the `vhost-keyshard` daemons (and `keyshard coordinator` for the broker mailbox), builds
# its volume and initramfs with images/*.sh, and boots through qemu-configs/run-qemu.sh. The
# tests get their paths from these variables (tests/src/env.rs):
#   KEYSHARD_E2E_KEYSHARD_BIN, KEYSHARD_E2E_VHOST_KEYSHARD_BIN   host binaries (debug profile,
#                                                               shared with `unit`)
#   KEYSHARD_E2E_GUEST_BIN     keyshard-guest, static (guest-static)
#   KEYSHARD_E2E_KERNEL        guest kernel: the newest /boot/vmlinuz-*-cloud-amd64 unless set
# swtpm and tpm2_pcrextend come from PATH (packages above),
# and optionally KEYSHARD_E2E_BOOT_TIMEOUT (seconds, default 240), KEYSHARD_E2E_KEEP=1 (keep
# each test's directory), and run-qemu.sh's KEYSHARD_ACCEL, KEYSHARD_QEMU, KEYSHARD_CPU and
# KEYSHARD_IOMMU_PLATFORM (=on runs every boot with iommu_platform=on).
E2E_TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))
GUEST_TARGET_DIR := $(E2E_TARGET_DIR)/guest-static
GUEST_BIN := $(GUEST_TARGET_DIR)/x86_64-unknown-linux-gnu/release/keyshard-guest
# (shell text, expanded when a recipe runs: after `deps` has installed the kernel)
E2E_KERNEL = "$${KEYSHARD_E2E_KERNEL:-$$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1)}"
E2E_ENV = KEYSHARD_E2E_KEYSHARD_BIN=$(E2E_TARGET_DIR)/debug/keyshard \
	KEYSHARD_E2E_VHOST_KEYSHARD_BIN=$(E2E_TARGET_DIR)/debug/vhost-keyshard \
	KEYSHARD_E2E_GUEST_BIN=$(GUEST_BIN) \
	KEYSHARD_E2E_KERNEL=$(E2E_KERNEL)

e2e: deps e2e-bins guest-static images
	$(E2E_ENV) $(CARGO) test -p keyshard-e2e --test boot --test tpm --test access_platform --test host_relay -- --ignored

e2e-bins:
	$(CARGO) build --bin keyshard --bin vhost-keyshard

# keyshard-guest for the initramfs: glibc, statically linked (no musl target to download). Its
# own target dir keeps RUSTFLAGS from invalidating the workspace build; --target keeps them off
# build scripts and proc macros.
guest-static:
	CARGO_TARGET_DIR=$(GUEST_TARGET_DIR) RUSTFLAGS='-C target-feature=+crt-static' \
		$(CARGO) build --release -p guest-driver --bin keyshard-guest --target x86_64-unknown-linux-gnu

# A bootable example (3-of-3 fragments, volume, initramfs) in $(E2E_TARGET_DIR)/images; it prints
# the commands that serve and boot it.
images: deps e2e-bins guest-static
	images/build-example.sh --keyshard $(E2E_TARGET_DIR)/debug/keyshard --guest-bin $(GUEST_BIN) \
		--kernel $(E2E_KERNEL) --out-dir $(E2E_TARGET_DIR)/images

demo: deps guest-static
	$(CARGO) build --release --bin keyshard --bin vhost-keyshard
	scripts/demo.sh $(E2E_TARGET_DIR)/release/keyshard
	scripts/demo-hosts.sh $(E2E_TARGET_DIR)/release/keyshard
	scripts/demo-vm.sh $(E2E_TARGET_DIR)/release/keyshard $(E2E_TARGET_DIR)/release/vhost-keyshard \
		$(GUEST_BIN) $(E2E_KERNEL)

bench:
	$(CARGO) bench -p keyshard-core --bench sharing

# Fragment devices: 4 KiB read latency against qemu-storage-daemon, and resident memory.
bench-devices: deps
	$(CARGO) bench -p vhost-keyshard --bench device_read

# The coordinator: tpm release latency on swtpm, sev releases on test-signed evidence, SNP checks/s.
bench-release: deps
	$(CARGO) bench -p keyshard-coordinator --bench release

# A host's boot storm (tests/benches/storm.rs): for each N, N VMs (examples/vhd-tpm.toml: vhd = 2,
# tpm = 1, each its own key) on one swtpm, ONE `vhost-keyshard` serving all 2N fragment devices and
# ONE `keyshard coordinator --state-root`; N host frontends (`keyshard-guest unlock` over the
# sockets) start at once and every key they write is checked against the one dealt. Prints wall
# time, p50/p99 per VM, TPM operations per release (the coordinator's count and swtpm's own
# command log) and resident memory, and marks issue 8's goals for N = 100 met or missed. Release
# builds of the host binaries; the static keyshard-guest. STORM_N: the sizes (default 10,50,100);
# KEYSHARD_STORM_COORDINATOR=per-vm runs one coordinator per VM instead, for comparison;
# KEYSHARD_STORM_TPM_DELAY_MS=200 holds every TPM response that long during the storm (a relay
# in front of swtpm), for a TPM as slow as a hardware one.
STORM_N ?= 10,50,100
bench-storm: deps guest-static
	$(CARGO) build --release --bin keyshard --bin vhost-keyshard
	KEYSHARD_E2E_KEYSHARD_BIN=$(E2E_TARGET_DIR)/release/keyshard \
		KEYSHARD_E2E_VHOST_KEYSHARD_BIN=$(E2E_TARGET_DIR)/release/vhost-keyshard \
		KEYSHARD_E2E_GUEST_BIN=$(GUEST_BIN) KEYSHARD_STORM_N="$(STORM_N)" \
		$(CARGO) bench -p keyshard-e2e --bench storm

# Credential fetch (keyshard/benches/fetch.rs): the real CMS (redb), 5 shard hosts and an instance,
# each on its own swtpm with EK certificates, on loopback; a 3-of-5 credential. Prints fetch
# latency p50/p99 with its phases (the CMS's challenge, quote and fetch; the host rounds), the
# CLI's own wall time, the swtpm quote alone, and attested map requests per CMS CPU-second.
# KEYSHARD_BENCH_FETCH_N fetches (default 50), KEYSHARD_BENCH_MAP_N map requests (default 1000:
# the CMS's CPU time is read in 10 ms ticks).
bench-fetch: deps
	$(CARGO) bench -p keyshard --bench fetch

# Fuzz a parser of untrusted bytes (nightly and cargo-fuzz; cargo-fuzz is installed when
# missing): `make fuzz FUZZ_TARGET=descriptor_chain`. Targets: fragment_parse, descriptor_chain,
# broker_message, attestation_evidence, shard_formats, cms_request.
FUZZ_TARGET ?= fragment_parse
FUZZ_MAX_LEN_fragment_parse := 1400
FUZZ_MAX_LEN_descriptor_chain := 16384
FUZZ_MAX_LEN_broker_message := 16384
FUZZ_MAX_LEN_attestation_evidence := 8192
# the largest sealed map (255 shards) is well under 128 KiB; longer inputs are refused up front
FUZZ_MAX_LEN_shard_formats := 131072
FUZZ_MAX_LEN_cms_request := 70000
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p fuzz/corpus/$(FUZZ_TARGET)
	cd fuzz && $(CARGO) +nightly fuzz run $(FUZZ_TARGET) corpus/$(FUZZ_TARGET) seeds/$(FUZZ_TARGET) -- \
		-max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN_$(FUZZ_TARGET))
