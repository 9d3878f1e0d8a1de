#!/usr/bin/env bash
# demo.sh: mirror a live ext4 filesystem with the eBPF capture agent and
# prove the mirror is byte-identical to the device.
#
# It builds bin/lifeboat, creates a 512 MiB loop device with ext4 on it,
# starts `lifeboat agent mirror`, writes, overwrites, deletes and trims files
# while the agent runs, stops the agent and compares device and mirror.
# Needs root and a kernel with BTF. Everything it creates lives in a fresh
# /var/tmp/lifeboat-demo.XXXXXX and is removed on exit, success or not.
#
# Environment: LIFEBOAT_DEMO_MODE=data|metadata (default data).
set -euo pipefail

cd "$(dirname "$0")/.."
command -v go >/dev/null 2>&1 || PATH="$PATH:/usr/local/go/bin"
PATH="$PATH:/usr/sbin:/sbin"

MODE=${LIFEBOAT_DEMO_MODE:-data}
SIZE=512M
READY_TEXT=mirroring # the agent logs "initial sync done; mirroring"
READY_TIMEOUT=60     # seconds
BIN=$PWD/bin/lifeboat

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo: FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (loop devices and eBPF): run sudo make demo"
[ -e /sys/kernel/btf/vmlinux ] || die "the kernel has no BTF (/sys/kernel/btf/vmlinux missing)"

missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
	say "apt-get install ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

say "go build -o bin/lifeboat ./cmd/lifeboat"
go build -o "$BIN" ./cmd/lifeboat

grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf

# mktemp: a directory of root's own, not one another user could have made.
WORK=$(mktemp -d /var/tmp/lifeboat-demo.XXXXXX)
MNT=$WORK/mnt
LOG=$WORK/agent.log
DEV=
AGENT=

cleanup() {
	local rc=$?
	set +e
	trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
	if [ -n "$AGENT" ] && kill -0 "$AGENT" 2>/dev/null; then
		kill -TERM "$AGENT" 2>/dev/null
		for _ in $(seq 50); do kill -0 "$AGENT" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$AGENT" 2>/dev/null
		wait "$AGENT" 2>/dev/null
	fi
	# A clean stop leaves the capture pinned on the bpffs: detach it.
	if [ -d "$WORK/state" ]; then
		"$BIN" agent release --state-dir "$WORK/state" ||
			echo "demo: could not release the pinned capture; run: $BIN agent release --state-dir $WORK/state" >&2
	fi
	if [ $rc -ne 0 ] && [ -s "$LOG" ]; then
		echo "--- last lines of the agent log ($LOG) ---" >&2
		tail -n 30 "$LOG" >&2
	fi
	mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
	[ -n "$DEV" ] && losetup -d "$DEV"
	rm -rf "$WORK"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "creating a $SIZE loop device with ext4"
truncate -s "$SIZE" "$WORK/disk.img"
DEV=$(losetup --find --show "$WORK/disk.img")
mkfs.ext4 -q -F "$DEV"
mkdir -p "$MNT"
mount "$DEV" "$MNT"

say "starting: lifeboat agent mirror --device $DEV --to $WORK/mirror.img --mode $MODE"
"$BIN" agent mirror --device "$DEV" --to "$WORK/mirror.img" --mode "$MODE" \
	--state-dir "$WORK/state" >"$LOG" 2>&1 &
AGENT=$!

for ((i = 0; ; i++)); do
	grep -q "$READY_TEXT" "$LOG" && break
	kill -0 "$AGENT" 2>/dev/null || die "the agent exited before it started mirroring"
	[ $i -lt $((READY_TIMEOUT * 5)) ] || die "the agent did not report \"$READY_TEXT\" within ${READY_TIMEOUT}s"
	sleep 0.2
done
say "agent is mirroring (pid $AGENT)"

say "workload: copy trees, random data, fio random writes, deletes, fstrim"
goroot=$(go env GOROOT)
# /usr/share/doc is ~100 MiB of small files on a Debian server; skip it if
# it would not fit next to the rest.
if [ "$(du -sm /usr/share/doc 2>/dev/null | cut -f1)" -le 200 ]; then
	cp -a /usr/share/doc "$MNT/doc"
else
	mkdir "$MNT/doc"
fi
cp -a "$goroot/src/net" "$goroot/src/crypto" "$MNT/"
dd if=/dev/urandom of="$MNT/random-1.bin" bs=1M count=48 status=none conv=fsync
dd if=/dev/urandom of="$MNT/random-2.bin" bs=1M count=32 status=none
fio --name=demo --directory="$MNT" --rw=randwrite --bs=4k --size=32m --ioengine=psync \
	--direct=1 --fsync=256 --output=/dev/null
# Overwrite the middle of a file in place, then free space and discard it.
dd if=/dev/urandom of="$MNT/random-1.bin" bs=1M seek=8 count=16 conv=notrunc,fsync status=none
rm -rf "$MNT/doc" "$MNT/random-2.bin"
sync
fstrim -v "$MNT" || echo "fstrim not supported here; continuing"
cp -a "$goroot/src/os" "$MNT/"
sync
say "filesystem usage: $(df -h --output=used "$MNT" | tail -n 1 | tr -d ' ')"

say "unmounting, then stopping the agent (SIGTERM)"
umount "$MNT"
kill -TERM "$AGENT"
if wait "$AGENT"; then rc=0; else rc=$?; fi
AGENT=
[ $rc -eq 0 ] || die "the agent exited with status $rc"
grep '^counters:' "$LOG" || echo "(the agent printed no counters line)"

say "comparing $DEV with the mirror"
size=$(blockdev --getsize64 "$DEV")
mirror_size=$(stat -c %s "$WORK/mirror.img")
[ "$mirror_size" -eq "$size" ] || die "mirror is $mirror_size bytes, device is $size bytes"
if ! cmp "$DEV" "$WORK/mirror.img"; then
	die "mirror differs from the device"
fi
echo "mirror equals device: OK ($size bytes)"
