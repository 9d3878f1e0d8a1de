# Lifeboat. `make help` lists the targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Go lives in /usr/local/go on the CI runner; mkfs, losetup etc. in /sbin.
export PATH := $(PATH):/usr/local/go/bin:/usr/sbin:/sbin

GO      ?= go
BIN     := bin/lifeboat
# Extra arguments for `lifeboat bench capture` (make bench) or `lifeboat bench
# pipeline` (make bench-pipeline), e.g. BENCH_ARGS="--runtime 30s --json bench.json".
BENCH_ARGS ?=
FUZZTIME   ?= 20s
# package:FuzzTarget pairs run by `make fuzz`.
FUZZ_TARGETS := ./agent/capture:FuzzDecode ./internal/bitmap:FuzzExtents \
                ./internal/wire:FuzzReader ./internal/seal:FuzzOpen \
                ./internal/recovery:FuzzDecodeSegment ./internal/aesgcm:FuzzSeal \
                ./internal/aesgcm:FuzzOpen ./internal/blobstore/azure:FuzzCRC64 \
                ./internal/channel:FuzzReadRecord ./internal/crc32c:FuzzUpdate

# command:Debian-package pairs the tests need (bookworm package names).
TEST_TOOLS := fio:fio mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs mkfs.ext4:e2fsprogs dumpe2fs:e2fsprogs sfdisk:fdisk losetup:mount node:nodejs npm:npm \
              blockdev:util-linux fstrim:util-linux setpriv:util-linux clang:clang llvm-strip:llvm \
              gcc:gcc

# install_missing installs the Debian packages of the missing commands among
# the command:package pairs in $(1). apt-get update runs only when something
# is missing; without root it only says what is missing (an error when CI=true).
define install_missing
	@missing=""; \
	for p in $(1); do \
		command -v "$${p%%:*}" >/dev/null 2>&1 || missing="$$missing $${p#*:}"; \
	done; \
	missing=$$(tr ' ' '\n' <<<"$$missing" | sort -u | xargs); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "missing packages: $$missing (install them as root: apt-get install -y $$missing)" >&2; \
		[ "$$CI" != true ] || exit 1; \
		exit 0; \
	fi; \
	echo "==> apt-get install $$missing"; \
	apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null
endef

# test's prerequisites must run in order.
.NOTPARALLEL:

.PHONY: help build test tools bpffs demo demo-mirror generate check-generated bench bench-pipeline fmt fmt-check vet lint fuzz clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build bin/lifeboat
	$(GO) build -o $(BIN) ./cmd/lifeboat

test: tools bpffs check-generated vet lint fmt-check ## everything CI runs: tools, generated-code check, vet, staticcheck, gofmt, all tests (as root)
	@echo "==> go test ./..."
	$(GO) test -count=1 -timeout 15m ./...
	@echo "==> go test -race (lock-free and concurrent packages; the process server's sessions, uploads and cache; the agent's stream; recovery's parallel reads; the freeze watchdog)"
	$(GO) test -count=1 -timeout 30m -race ./internal/spsc/ ./internal/bitmap/ ./internal/wire/ ./internal/channel/ ./agent/capture/ \
		./agent/stream/ ./processserver/ ./processserver/cache/ ./internal/recovery/ ./internal/fsfreeze/
	@echo "==> go test -race (the capture's ring reader and the agent's loop, under fio)"
	$(GO) test -count=1 -race -run 'TestMirror(RandomDirectWrites|TinyRingOverflow|WritesDuringInitialCopy)$$' ./agent/
	@echo "==> go test -tags purego (the portable paths beside the assembly)"
	$(GO) test -count=1 -tags purego -run 'Seal|Open|KnownAnswer|CRC64|Accelerated|RandomLengths' ./internal/aesgcm/ ./internal/blobstore/azure/
	$(GO) test -count=1 -tags purego ./internal/channel/ ./internal/crc32c/ ./internal/wire/

tools: ## install the missing test tools (fio, xfsprogs, btrfs-progs, e2fsprogs, fdisk, mount, util-linux, Node.js and npm for Azurite, clang, llvm, gcc for -race) with apt-get
	$(call install_missing,$(TEST_TOOLS))

bpffs: ## mount the BPF filesystem at /sys/fs/bpf if it is not mounted (root)
	@if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then \
		if [ "$$(id -u)" = 0 ]; then echo "==> mount -t bpf bpf /sys/fs/bpf"; mount -t bpf bpf /sys/fs/bpf; \
		else echo "bpffs is not mounted at /sys/fs/bpf (mount it as root)" >&2; [ "$$CI" != true ] || exit 1; fi; \
	fi

demo: ## replicate a live ext4 loop device to Azurite through a process server, then recover two points and verify them (root)
	scripts/demo-replication.sh

demo-mirror: ## mirror a loop device with the capture agent alone under a live ext4 workload and verify the copy (root)
	scripts/demo.sh

generate: ## regenerate the eBPF objects and Go bindings (installs clang and llvm if missing)
	$(call install_missing,clang:clang llvm-strip:llvm)
	$(GO) generate ./agent/capture

check-generated: ## check the committed eBPF objects match bpf/ (reference: clang 14, Debian bookworm)
	@echo "==> scripts/check-generated.sh"
	@scripts/check-generated.sh

bench: build ## run the fio capture benchmark: no capture, metadata mode, data mode (root)
	$(BIN) bench capture $(BENCH_ARGS)

bench-pipeline: build ## run the replication benchmark: raw Put Page ceiling vs agent → process server → Azurite (root)
	$(BIN) bench pipeline $(BENCH_ARGS)

fmt: ## gofmt the Go sources in place
	@gofmt -l -w $$(find . \( -name .git -o -name .cache -o -name node_modules -o -name bin \) -prune -o -name '*.go' -print)

fmt-check: ## fail if a Go source is not gofmt-ed
	@echo "==> gofmt check"
	@files=$$(gofmt -l $$(find . \( -name .git -o -name .cache -o -name node_modules -o -name bin \) -prune -o -name '*.go' -print)); \
	if [ -n "$$files" ]; then echo "gofmt needed (run make fmt) on:" >&2; sed 's/^/  /' <<<"$$files" >&2; exit 1; fi

vet: ## go vet ./...
	@echo "==> go vet ./..."
	$(GO) vet ./...

lint: ## staticcheck ./... (pinned as a tool in go.mod)
	@echo "==> staticcheck ./..."
	$(GO) tool staticcheck ./...

fuzz: ## run each fuzz target for FUZZTIME (default 20s)
	@for t in $$(grep -rEo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*' . | sed -E 's|/[^/]*_test\.go:func |:|'); do \
		case " $(FUZZ_TARGETS) " in *" $$t "*) ;; *) echo "fuzz target $$t is not in FUZZ_TARGETS" >&2; exit 1;; esac; \
	done
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "==> fuzz $${t#*:} in $${t%%:*}"; \
		$(GO) test -list="^$${t#*:}\$$" "$${t%%:*}" | grep -qx "$${t#*:}" || \
			{ echo "fuzz target $${t#*:} not found in $${t%%:*}" >&2; exit 1; }; \
		$(GO) test -run='^$$' -fuzz="^$${t#*:}\$$" -fuzztime=$(FUZZTIME) "$${t%%:*}"; \
	done

clean: ## remove build output
	rm -rf bin
	rm -f *.test *.prof
