#!/usr/bin/env bash
# Installs what building, packaging and testing Shunt needs on a fresh Debian-based Linux machine, and nothing
# that is already there: the pinned Rust toolchain with the Windows targets, osslsigncode (test-signing),
# mingw-w64 (cross-building the x64 shuntctl.exe), openssl (the test certificate), and zig with cargo-zigbuild from
# PyPI (cross-building the ARM64 shuntctl.exe, for which Debian has no mingw-w64). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for package in osslsigncode gcc-mingw-w64-x86-64 openssl; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "bootstrap: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# rust-toolchain.toml pins the toolchain and lists its components and targets; installing it is a no-op when
# everything is present.
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
targets=x86_64-pc-windows-msvc,aarch64-pc-windows-msvc,x86_64-pc-windows-gnu,aarch64-pc-windows-gnullvm
rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy --target "$targets" \
    >/dev/null 2>&1 || rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy \
    --target "$targets"

if ! python3 -m pip show ziglang cargo-zigbuild >/dev/null 2>&1; then
    echo "bootstrap: installing ziglang and cargo-zigbuild from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check ziglang cargo-zigbuild
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
fi
echo "bootstrap: ready"
