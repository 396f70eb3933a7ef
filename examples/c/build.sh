#!/usr/bin/env bash
# Builds examples/c/basic.c against libgpupool_ffi.so with the generated header, rpath set.
#
#     examples/c/build.sh [release|debug]     (default release; builds the library with cargo)
#
# GPUPOOL_LIB_DIR=<dir> uses the libgpupool_ffi.so in <dir> as it is (no cargo run), and
# OUT=<dir> puts the program there (default: <library dir>/examples-c). CC picks the compiler.
# Prints the program's path.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
profile="${1:-release}"
case "$profile" in
    release) cargo_flags=(--release) ;;
    debug) cargo_flags=() ;;
    *) echo "usage: $0 [release|debug]" >&2; exit 2 ;;
esac
if [ -n "${GPUPOOL_LIB_DIR:-}" ]; then
    lib_dir="$GPUPOOL_LIB_DIR"
else
    cargo build "${cargo_flags[@]}" -p gpupool-ffi --manifest-path "$root/Cargo.toml" >&2
    lib_dir="${CARGO_TARGET_DIR:-$root/target}/$profile"
fi
if [ ! -f "$lib_dir/libgpupool_ffi.so" ]; then
    echo "$0: no libgpupool_ffi.so in $lib_dir" >&2
    exit 1
fi
out="${OUT:-$lib_dir/examples-c}"
mkdir -p "$out"
"${CC:-cc}" -std=c11 -Wall -Wextra -Werror -pedantic \
    -I "$root/crates/gpupool-ffi/include" \
    "$root/examples/c/basic.c" \
    -L "$lib_dir" -lgpupool_ffi -Wl,-rpath,"$lib_dir" \
    -o "$out/basic"
echo "$out/basic"
