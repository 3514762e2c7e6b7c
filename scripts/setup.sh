#!/usr/bin/env bash
# Installs what miggate's build, demo and tests need on Debian/Ubuntu, or
# says exactly what is missing. Idempotent: installs only what is absent.
set -euo pipefail

# Debian packages: QEMU (the real peers of every test), openssl (awkward
# test certificates), gnutls-bin (certtool, to inspect certificates),
# socat and stunnel4 (the benchmark's comparison peers), seabios comes with
# qemu-system-x86.
PACKAGES=(qemu-system-x86 openssl gnutls-bin socat stunnel4 ca-certificates)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null; then
        echo "setup: missing packages ${missing[*]} and no apt-get here; install them by hand" >&2
        exit 1
    fi
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then SUDO=(sudo); else
            echo "setup: run as root or install sudo; missing packages: ${missing[*]}" >&2
            exit 1
        fi
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    cat >&2 <<'MSG'
setup: Rust is missing. miggate needs Rust >= 1.80 (Debian's packaged rustc is
too old). Install it with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . "$HOME/.cargo/env"
MSG
    exit 1
fi

# The C compiler builds aws-lc (rustls' crypto provider).
if ! command -v cc >/dev/null; then
    echo "setup: a C compiler is needed to build aws-lc: apt-get install build-essential" >&2
    exit 1
fi

if [ ! -w /dev/kvm ]; then
    echo "setup: note: /dev/kvm is not usable here; guests run under TCG (slower, still correct)"
fi
