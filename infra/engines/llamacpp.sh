#!/usr/bin/env bash
# Build llama.cpp's OpenAI-compatible server (serve.engine: llamacpp) into OUT/bin/llama-server.
#
#   llamacpp.sh OUT
#
# The sources come hash-checked from the machine's package index (infra/engines/llamacpp.txt); the
# server alone is compiled, for this machine's CPU (GGML_NATIVE; GGML_NATIVE=OFF for a portable
# build), statically linked to ggml and with ggml's own thread pool rather than OpenMP, so that it
# needs nothing beyond libstdc++ (the serving image copies it in): about 4 minutes on 2 cores. Needs
# cmake and a C++ compiler (installed from Debian when missing, as root).
set -euo pipefail

out="$1"
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
    echo "Installing Debian's cmake and g++ to build llama.cpp's server"
    "$here/../apt-install.sh" "install cmake and a C++ compiler (or run 'make test LLAMACPP_TESTS=0')" cmake g++
fi

work="$out/build"
rm -rf "$work"
mkdir -p "$work"
"$python" -m pip download --quiet --no-deps --no-binary :all: --require-hashes \
    -r "$here/llamacpp.txt" -d "$work" >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
source_dir="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
echo "Building llama-server from $(basename "$(dirname "$(dirname "$source_dir")")") (log: $work/build.log)"
{
    cmake -S "$source_dir" -B "$work/cmake" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE="${GGML_NATIVE:-ON}" -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF  # the web UI would be fetched from a hub; the gateway needs none
    cmake --build "$work/cmake" --target llama-server -j "$(nproc)"
} >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log"; echo "build failed; the whole log: $work/build.log"; exit 1; }

mkdir -p "$out/bin"
cp "$work/cmake/bin/llama-server" "$out/bin/llama-server.partial"
mv "$out/bin/llama-server.partial" "$out/bin/llama-server"  # whole or not at all
rm -rf "$work"
"$out/bin/llama-server" --version 2>&1 | head -n 1
