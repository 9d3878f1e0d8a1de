#!/usr/bin/env bash
# check-generated.sh: fail when the committed bpf2go output in agent/capture
# does not match what `go generate ./agent/capture` produces from bpf/.
#
# The check regenerates into a temporary copy of the repository, so it never
# touches the working tree. The .o files are compared byte for byte, and
# clang output differs between clang versions: the reference toolchain is
# Debian bookworm's clang 14 (`apt-get install clang llvm`). With another
# clang major version only the generated Go files are compared and a stale
# object file is reported as a warning.
#
# Without clang the check is skipped (exit 0), except when CI=true: there
# clang and llvm are installed with apt-get (as root) and the check runs.
set -euo pipefail

cd "$(dirname "$0")/.."
command -v go >/dev/null 2>&1 || PATH="$PATH:/usr/local/go/bin"

pkg=agent/capture
ref_clang=14

have_clang() { command -v clang >/dev/null 2>&1 && command -v llvm-strip >/dev/null 2>&1; }

if ! have_clang; then
	if [ "${CI:-}" != true ]; then
		echo "check-generated: clang/llvm-strip not found; skipping the check that $pkg is up to date."
		echo "check-generated: install them with: apt-get install -y clang llvm"
		exit 0
	fi
	if [ "$(id -u)" != 0 ]; then
		echo "check-generated: CI=true but clang/llvm-strip are missing and we are not root to install them" >&2
		exit 1
	fi
	echo "check-generated: installing clang and llvm"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang llvm >/dev/null
	have_clang || { echo "check-generated: clang still missing after apt-get install" >&2; exit 1; }
fi

clang_version=$(clang --version | head -n 1)
clang_major=$(clang -dumpversion | cut -d. -f1)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/lifeboat-check-generated.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Copy the source tree, not .git or build and cache output.
tar -cf - --exclude=./.git --exclude=./bin --exclude=./.cache --exclude=./node_modules . | tar -xf - -C "$tmp"

if ! (cd "$tmp" && GOWORK=off go generate "./$pkg"); then
	echo "check-generated: go generate ./$pkg failed (with $clang_version)" >&2
	exit 1
fi

stale_go=()
stale_obj=()
for f in "$tmp/$pkg"/*_bpfel.go "$tmp/$pkg"/*_bpfel.o; do
	[ -e "$f" ] || continue
	rel=${f#"$tmp/"}
	if [ -e "$rel" ] && cmp -s "$f" "$rel"; then
		continue
	fi
	case $rel in
	*.o) stale_obj+=("$rel") ;;
	*) stale_go+=("$rel") ;;
	esac
done
# A committed output that generation no longer produces is stale too.
for f in "$pkg"/*_bpfel.go "$pkg"/*_bpfel.o; do
	[ -e "$f" ] || continue
	[ -e "$tmp/$f" ] || stale_go+=("$f (no longer generated)")
done

if [ "$clang_major" != "$ref_clang" ] && [ ${#stale_obj[@]} -gt 0 ]; then
	echo "check-generated: warning: ${stale_obj[*]} differ from a rebuild with $clang_version;"
	echo "check-generated: warning: the reference is clang $ref_clang (Debian bookworm), so only the Go files are checked here."
	if [ "${CI:-}" = true ]; then
		# CI must tell a stale object from another compiler's bytes.
		echo "check-generated: FAIL: CI needs clang $ref_clang to check the committed object (install clang-$ref_clang)." >&2
		exit 1
	fi
	stale_obj=()
fi

stale=("${stale_go[@]}" "${stale_obj[@]}")
if [ ${#stale[@]} -gt 0 ]; then
	{
		echo "check-generated: FAIL: generated eBPF files are stale:"
		printf '  %s\n' "${stale[@]}"
		echo "Run \`make generate\` (clang $ref_clang, Debian bookworm) and commit the result."
		echo "(regenerated with: $clang_version)"
	} >&2
	exit 1
fi
echo "check-generated: $pkg is up to date ($clang_version)"
