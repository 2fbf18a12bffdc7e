#!/usr/bin/env bash
# aarch64 (NEON) checks on an x86-64 development machine: clippy for aarch64-unknown-linux-gnu,
# then the library's tests cross-compiled and run under qemu-user (user-mode emulation: the
# NEON level of `src/kernels/` runs instruction by instruction, so the tests check its results,
# not its speed). Not part of the README's test command: a cross build of every dependency takes
# ~6 minutes on 2 cores, the tests under emulation a few more.
#
# Needs (Debian 12): the Rust standard library for the target and a cross linker, plus qemu:
#   rustup target add aarch64-unknown-linux-gnu
#   apt-get install -y --no-install-recommends qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
#
# Usage, from the repository root: bash scripts/aarch64-check.sh [TEST FILTER...]
# (filters as for the test binary, e.g. `kernels::`; default: every library test). The build goes
# to the usual target directory, under target/aarch64-unknown-linux-gnu/.
set -euo pipefail

cd "$(dirname "$0")/.."
T=aarch64-unknown-linux-gnu
missing=()
rustup target list --installed 2>/dev/null | grep -x "$T" >/dev/null || missing+=("rustup target add $T")
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=("apt-get install gcc-aarch64-linux-gnu")
[ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] || missing+=("apt-get install libc6-dev-arm64-cross")
command -v qemu-aarch64 >/dev/null || missing+=("apt-get install qemu-user")
if [ ${#missing[@]} -gt 0 ]; then
    echo "aarch64-check: missing tools; install them first:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 2
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"

echo "== clippy (aarch64, -D warnings)"
cargo clippy --release --all-targets --target "$T" -- -D warnings
echo "== library tests under qemu-aarch64"
# skipped: the resident-peak test re-runs its own binary as a child process (current_exe); under
# qemu-user here that child fails without output (most likely no binfmt handler for aarch64, so
# the child does not go through qemu)
cargo test --release --lib --target "$T" -- \
    --skip monitor::rss::tests::a_leaked_buffer_that_was_written_shows_above_the_baseline "$@"
