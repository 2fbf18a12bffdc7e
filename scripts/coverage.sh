#!/usr/bin/env bash
# SC-004 line coverage of dsopt's own code (library, binary and CLI paths exercised by tests).
#
# Needs only the Rust toolchain's llvm-tools (installed here with rustup if missing): the
# dsopt crates are compiled with `-C instrument-coverage` through a small rustc wrapper, the
# dependencies are not (they are neither measured nor rebuilt differently), every test binary
# and every `dsopt` process the CLI tests start write a profile, and llvm-cov reports the lines
# of src/ that ran.
#
#   scripts/coverage.sh                 # the whole test suite (what CI runs), then the report
#   scripts/coverage.sh --lib report::  # any `cargo test` arguments narrow the run
#
# Output: the per-file table and TOTAL line on stdout, target/coverage/summary.txt, and
# target/coverage/lcov.info. Exit status: that of the tests (the report is printed anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SYSROOT=$(rustc --print sysroot)
HOST=$(rustc -vV | sed -n 's/^host: //p')
BIN="$SYSROOT/lib/rustlib/$HOST/bin"
PROFDATA="$BIN/llvm-profdata"
COV="$BIN/llvm-cov"
if [ ! -x "$COV" ] || [ ! -x "$PROFDATA" ]; then
    rustup component add llvm-tools-preview
fi

# A separate target folder: instrumented dsopt objects never mix with the normal build. It
# starts as a copy of target/release when that exists, so dependencies are not compiled again.
export CARGO_TARGET_DIR="$ROOT/target/coverage"
if [ ! -d "$CARGO_TARGET_DIR/release" ] && [ -d "$ROOT/target/release" ]; then
    mkdir -p "$CARGO_TARGET_DIR"
    cp -a "$ROOT/target/release" "$CARGO_TARGET_DIR/release"
fi
# cargo's fingerprints do not see the wrapper: rebuild dsopt's own crates instrumented
cargo clean --release -p dsopt
PROFILES="$CARGO_TARGET_DIR/profiles"
rm -rf "$PROFILES"
mkdir -p "$PROFILES"

# rustc wrapper: instrument only sources of this repository (not the cargo registry)
WRAPPER="$CARGO_TARGET_DIR/rustc-cov-wrapper.sh"
cat >"$WRAPPER" <<EOF
#!/usr/bin/env bash
for a in "\$@"; do
    case "\$a" in
        $ROOT/src/*.rs|src/*.rs|$ROOT/tests/*.rs|tests/*.rs)
            exec "\$@" -C instrument-coverage ;;
    esac
done
exec "\$@"
EOF
chmod +x "$WRAPPER"
export RUSTC_WRAPPER="$WRAPPER"
export LLVM_PROFILE_FILE="$PROFILES/%p-%m.profraw"

status=0
cargo test --release "$@" || status=$?

# every executable the tests ran: the test binaries and the dsopt binary
shopt -s nullglob
RAW=("$PROFILES"/*.profraw)
if [ ${#RAW[@]} -eq 0 ]; then
    echo "coverage: no profiles were written (were the tests built instrumented?)" >&2
    exit $(( status == 0 ? 3 : status ))
fi

mapfile -t OBJECTS < <(
    cargo test --release --no-run --message-format=json "$@" 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p'
)
OBJECTS+=("$CARGO_TARGET_DIR/release/dsopt")
ARGS=()
for o in "${OBJECTS[@]}"; do
    [ -f "$o" ] && ARGS+=(--object "$o")
done

"$PROFDATA" merge -sparse "${RAW[@]}" -o "$PROFILES/merged.profdata"
IGNORE='(\.cargo/registry|/rustc/|/target/|(^|/)tests/)'
"$COV" report --instr-profile "$PROFILES/merged.profdata" --ignore-filename-regex "$IGNORE" \
    "${ARGS[@]}" | tee "$CARGO_TARGET_DIR/summary.txt"
"$COV" export --format=lcov --instr-profile "$PROFILES/merged.profdata" \
    --ignore-filename-regex "$IGNORE" "${ARGS[@]}" >"$CARGO_TARGET_DIR/lcov.info"
awk -F: '/^LF:/ {found += $2} /^LH:/ {hit += $2}
    END {if (found == 0) {print "line coverage of src/: no lines found"; exit}
         printf "line coverage of src/: %d of %d lines = %.2f %%\n", hit, found, 100 * hit / found}' \
    "$CARGO_TARGET_DIR/lcov.info" | tee -a "$CARGO_TARGET_DIR/summary.txt"
exit $status
