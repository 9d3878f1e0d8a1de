#!/usr/bin/env bash
# make demo: Azurite + a process server + an agent protecting an ext4 loop
# device; a filesystem workload in two phases; then recovery of the latest
# point and of a point between the phases, both compared byte for byte with
# the device as it was. Everything runs on 127.0.0.1 and is removed at exit.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"

# The version and the cache the tests use (internal/azurite).
AZURITE_VERSION=$(sed -n 's/^const Version = "\(.*\)"$/\1/p' internal/azurite/azurite.go)
CACHE=${LIFEBOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lifeboat/azurite}
BIN=$PWD/bin/lifeboat
MACHINE=demo-vm

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it loads eBPF programs and creates loop devices)"
[ -e /sys/kernel/btf/vmlinux ] || die "this kernel exposes no BTF (/sys/kernel/btf/vmlinux): capture needs it"
[ -n "$AZURITE_VERSION" ] || die "no Azurite version in internal/azurite/azurite.go"
pkgs=""
for tp in losetup:mount mkfs.ext4:e2fsprogs fstrim:util-linux cmp:diffutils python3:python3 node:nodejs npm:npm flock:util-linux; do
	command -v "${tp%%:*}" >/dev/null || pkgs="$pkgs ${tp#*:}"
done
if [ -n "$pkgs" ]; then
	say "installing:$pkgs"
	apt-get update -qq
	# shellcheck disable=SC2086
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
# As internal/azurite.MinNode.
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] || die "Azurite needs Node.js 20 or later (found $(node --version))"

say "go build -o bin/lifeboat ./cmd/lifeboat"
go build -o "$BIN" ./cmd/lifeboat

mkdir -p "$CACHE"
# Azurite and every package it depends on, as internal/azurite/npm pins
# them (the tests install from the same files).
installed() {
	[ -x "$CACHE/node_modules/.bin/azurite-blob" ] && cmp -s internal/azurite/npm/package-lock.json "$CACHE/package-lock.json" &&
		grep -q "\"version\": \"$AZURITE_VERSION\"" "$CACHE/node_modules/azurite/package.json" 2>/dev/null
}
if ! installed; then
	say "npm ci: azurite@$AZURITE_VERSION and its locked dependencies (once, into $CACHE)"
	# Two demos (or a demo and the tests) at once take turns.
	(
		flock 9
		installed || {
			cp internal/azurite/npm/package.json internal/azurite/npm/package-lock.json "$CACHE"/
			npm ci --no-audit --no-fund --loglevel=error --prefix "$CACHE" >/dev/null
		}
	) 9>"$CACHE/.install.lock"
fi

W=$(mktemp -d /var/tmp/lifeboat-demo.XXXXXX)
PIDS=()
DEV=""
cleanup() {
	status=$?
	set +e
	# A second Ctrl-C must not cut the clean-up short (the children run in
	# sessions of their own: the terminal's signals reach this script only,
	# and the agent stops before the process server, the server before
	# Azurite).
	trap '' INT TERM
	if [ "$status" != 0 ] && [ "$status" != 130 ]; then
		# What went wrong is in the logs about to be removed (KEEP=1 keeps $W).
		for f in "$W"/*.log; do
			[ -s "$f" ] && { printf -- '--- last lines of %s\n' "$(basename "$f")" >&2; tail -n 15 "$f" >&2; }
		done
	fi
	# The agent first (its drain needs the process server), Azurite last;
	# each gets 90 s (the agent's stop timeout is 1 min), then SIGKILL.
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		kill -TERM "${PIDS[i]}" 2>/dev/null
		for _ in $(seq 900); do kill -0 "${PIDS[i]}" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "${PIDS[i]}" 2>/dev/null
		wait "${PIDS[i]}" 2>/dev/null
	done
	mountpoint -q "$W/mnt" && umount "$W/mnt"
	if ! "$BIN" agent release --state-dir "$W/agent" --name "$MACHINE" >/dev/null 2>&1 && [ -d "$W/agent" ]; then
		printf 'demo: the capture may still be attached: run %s agent release --state-dir %s --name %s\n' "$BIN" "$W/agent" "$MACHINE" >&2
		KEEP=1
	fi
	[ -n "$DEV" ] && losetup -d "$DEV"
	[ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
# A Ctrl-C ends the demo even when it lands while a lifeboat command that
# handles SIGINT runs in the foreground (bash would go on after it).
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_port PORT PID: a first start of Node on a loaded machine is slow.
wait_port() {
	for _ in $(seq 600); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		kill -0 "$2" 2>/dev/null || die "the process meant to listen on port $1 exited"
		sleep 0.1
	done
	die "nothing listens on port $1 after 60 s"
}

APORT=$(free_port)
say "starting Azurite on 127.0.0.1:$APORT"
mkdir -p "$W/azurite"
setsid "$CACHE/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$APORT" --location "$W/azurite" \
	--skipApiVersionCheck --silent --disableTelemetry >"$W/azurite.log" 2>&1 &
PIDS+=($!)
wait_port "$APORT" "$!"
export AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:$APORT/devstoreaccount1;"

say "recovery key, CA and certificates"
"$BIN" keys init --to "$W/recovery.key" >/dev/null
"$BIN" pki init --dir "$W/pki" >/dev/null
"$BIN" pki issue --dir "$W/pki" --name ps1 --role process-server >/dev/null
"$BIN" pki issue --dir "$W/pki" --name "$MACHINE" --role agent >/dev/null

PSPORT=$(free_port)
say "starting the process server on 127.0.0.1:$PSPORT (cache over 3 directories, 2 data + 1 parity; one disk here, one disk each in real use)"
setsid "$BIN" process-server --listen "127.0.0.1:$PSPORT" --pki "$W/pki" --name ps1 \
	--cache "$W/cache1,$W/cache2,$W/cache3" --recovery-key "$W/recovery.key" --point-interval 5s \
	>"$W/ps.log" 2>&1 &
PIDS+=($!)
wait_port "$PSPORT" "$!"

say "creating a 256 MiB loop device with ext4"
truncate -s 256M "$W/disk.img"
DEV=$(losetup --find --show "$W/disk.img")
mkfs.ext4 -q -F "$DEV"
mkdir -p "$W/mnt"

say "starting the agent: lifeboat agent --device disk0=$DEV"
setsid "$BIN" agent --process-server "127.0.0.1:$PSPORT" --pki "$W/pki" --name "$MACHINE" --device "disk0=$DEV" \
	--state-dir "$W/agent" --crash-interval 2s >"$W/agent.log" 2>&1 &
AGENT=$!
PIDS+=("$AGENT")
for _ in $(seq 300); do grep -q "initial sync done" "$W/agent.log" && break; kill -0 "$AGENT" || { cat "$W/agent.log"; die "agent exited"; }; sleep 0.2; done
grep -q "initial sync done" "$W/agent.log" || die "initial sync did not finish in 60 s"

# recoverable_until as seconds since the epoch (0 if none yet).
until_epoch() {
	"$BIN" points --machine "$MACHINE" --json 2>/dev/null |
		python3 -c 'import sys,json,datetime; d=json.load(sys.stdin); t=d.get("recoverable_until") or ""; print(datetime.datetime.fromisoformat(t.replace("Z","+00:00")).timestamp() if t else 0)' 2>/dev/null || echo 0
}
# wait_recoverable T: until everything up to T is in the storage account.
wait_recoverable() {
	for _ in $(seq 600); do
		python3 -c "import sys; sys.exit(0 if float('$(until_epoch)') >= $1 else 1)" && return 0
		sleep 0.2
	done
	"$BIN" points --machine "$MACHINE" >&2 || true # says why, if it fails
	die "the storage account did not catch up with $(date -u -d "@${1%.*}" +%T) in 2 minutes"
}
RPOS=()
sample_rpo() { # RPO = now - recoverable_until, once there is one
	local u
	u=$(until_epoch)
	[ "$u" = 0 ] || RPOS+=("$(python3 -c "import time; print(round(time.time()-$u,1))")")
}

workload() { # phase
	cp -r "$(go env GOROOT)/src/net" "$W/mnt/net-$1"
	for i in 1 2 3 4; do head -c $((3 << 20)) /dev/urandom >"$W/mnt/random-$1-$i"; sample_rpo; done
	rm -rf "$W/mnt/net-$1/http"
	fstrim "$W/mnt" >/dev/null
	sync
	sample_rpo
}

say "workload, phase 1"
mount "$DEV" "$W/mnt"
workload 1
umount "$W/mnt"
# Idle now: the time T below is a point in the middle; the device as it is
# now is what a recovery to T must give back.
sleep 2
cp --sparse=always "$DEV" "$W/middle.img"
T=$(python3 -c 'import time; print(time.time())')
TMID=$(python3 -c "import datetime; print(datetime.datetime.fromtimestamp($T, datetime.timezone.utc).isoformat(timespec='milliseconds').replace('+00:00','Z'))")
wait_recoverable "$T"
sleep 1

say "workload, phase 2"
mount "$DEV" "$W/mnt"
workload 2
umount "$W/mnt"
END=$(python3 -c 'import time; print(time.time())')
wait_recoverable "$END"
sample_rpo
say "RPO seen during the workload (seconds): ${RPOS[*]}"

"$BIN" points --machine "$MACHINE"

say "recovering the latest point"
"$BIN" recover --machine "$MACHINE" --disk disk0 --point latest --to "$W/latest.img" --recovery-key "$W/recovery.key"
cmp "$DEV" "$W/latest.img" || die "latest recovery differs from the device"
echo "latest point equals the device: OK ($(stat -c %s "$W/latest.img") bytes)"

say "recovering the point at $TMID (between the phases)"
"$BIN" recover --machine "$MACHINE" --disk disk0 --point "$TMID" --to "$W/middle-recovered.img" --recovery-key "$W/recovery.key"
cmp "$W/middle.img" "$W/middle-recovered.img" || die "recovery at $TMID differs from the device as it was then"
echo "point at $TMID equals the device as it was then: OK"
