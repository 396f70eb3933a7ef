#!/usr/bin/env bash
# Builds benches/peers/replay_peers.cpp against the installed PyTorch (libtorch's c10 and
# c10_cuda) with nvcc. Run it on the GPU machine, from anywhere:
#
#   devscripts/build_peers.sh            # builds $BUILD_DIR/replay_peers if missing or stale
#   devscripts/build_peers.sh --force    # rebuilds
#
# BUILD_DIR defaults to /tmp/gpupool-peers (outside the repository, nothing to ignore).
# Prints the path of the binary on its last line. Needs: python3 with torch, nvcc.
#
# Linking: the program links the same libcudart.so that libc10_cuda.so uses (the one PyTorch
# ships, found through ldd), with `-cudart none`, so that the process holds one CUDA runtime,
# not nvcc's static one beside PyTorch's shared one. The C++ ABI flag comes from
# torch._C._GLIBCXX_USE_CXX11_ABI.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$ROOT/benches/peers/replay_peers.cpp
BUILD_DIR=${BUILD_DIR:-/tmp/gpupool-peers}
BIN=$BUILD_DIR/replay_peers
mkdir -p "$BUILD_DIR"

if [ "${1:-}" != "--force" ] && [ -x "$BIN" ] && [ "$BIN" -nt "$SRC" ]; then
    echo "$BIN"
    exit 0
fi

PY=${PYTHON:-python3}
TORCH=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
    if command -v nvcc >/dev/null 2>&1; then NVCC=$(command -v nvcc)
    elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
    else echo "build_peers.sh: nvcc not found (set NVCC=)" >&2; exit 2
    fi
fi

# The CUDA runtime that libc10_cuda.so is linked against.
CUDART=$(ldd "$TORCH/lib/libc10_cuda.so" | awk '/libcudart\.so/ {print $3; exit}')
CUDART_FLAGS=()
if [ -n "$CUDART" ] && [ -f "$CUDART" ]; then
    ln -sf "$CUDART" "$BUILD_DIR/libcudart.so"
    CUDART_FLAGS=(-cudart none -L"$BUILD_DIR" -lcudart -Xlinker -rpath -Xlinker "$(dirname "$CUDART")")
else
    echo "build_peers.sh: libc10_cuda.so names no libcudart (ldd); linking nvcc's shared runtime" >&2
    CUDART=""
    CUDART_FLAGS=(-cudart shared)
fi

echo "build_peers.sh: torch $TORCH_VERSION at $TORCH, CXX11 ABI $ABI, nvcc $("$NVCC" --version | tail -1), cudart ${CUDART:-from nvcc}" >&2
"$NVCC" -std=c++17 -O2 -x c++ "$SRC" -o "$BIN.tmp" \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
    -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" \
    -L"$TORCH/lib" -lc10_cuda -lc10 \
    -Xlinker -rpath -Xlinker "$TORCH/lib" \
    "${CUDART_FLAGS[@]}" \
    -Xcompiler -Wall
mv "$BIN.tmp" "$BIN"
echo "$BIN"
