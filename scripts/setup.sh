#!/usr/bin/env bash
# Installs what miggate's build, demo and tests need on Debian/Ubuntu, or
# says exactly what is missing. Idempotent: installs only what is absent.
# --qemu10-optional: a QEMU 10.0 that cannot be installed is a warning, not
# an error (the demo runs on the system's QEMU; the tests need both).
set -euo pipefail
QEMU10_REQUIRED=1
if [ "${1:-}" = "--qemu10-optional" ]; then QEMU10_REQUIRED=0; fi

# Debian packages: QEMU (the real peers of every test), openssl (awkward
# test certificates), gnutls-bin (certtool, to inspect certificates),
# socat and stunnel4 (the benchmark's comparison peers), seabios comes with
# qemu-system-x86. systemd for systemd-analyze (the unit's test checks
# contrib/systemd with it; a Debian 12 container lacks it; it is not run as
# init).
PACKAGES=(qemu-system-x86 openssl gnutls-bin socat stunnel4 ca-certificates systemd)

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

# QEMU 10.0 beside Debian 12's 7.2, for the tests that run on 10.0 and
# across versions: qemu-system-x86 10.0.x from the bookworm-backports suite
# of the archive this machine already uses, unpacked (never installed)
# into a fixed directory outside the checkout, with apt state of its own
# so that the system's apt configuration is not touched. The lab finds it
# there (crates/lab/src/qemu.rs, QEMU_10_DIR) and adds `-L` for its data.
QEMU10_DIR=${MIGGATE_QEMU10_DIR:-/opt/miggate/qemu-10.0}
QEMU10_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data)
install_qemu10() {
    # The archive's URI and keyring, from the machine's own apt sources
    # (deb822 .sources files, or one-line sources.list entries).
    uri=$(awk 'tolower($1)=="uris:" && $2 ~ /\/debian\/?$/ {print $2; exit}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    keyring=$(awk 'tolower($1)=="signed-by:" {print $2; exit}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            sed -E 's/\[[^]]*\]//' | awk '$2 ~ /\/debian\/?$/ {print $2; exit}' || true)
    fi
    keyring=${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}
    if [ -z "$uri" ]; then
        echo "setup: QEMU 10.0: no Debian archive (URI ending in /debian) in /etc/apt/sources.list{,.d}; cannot derive its bookworm-backports suite" >&2
        return 1
    fi
    work=$(mktemp -d /tmp/miggate-qemu10.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    chmod 755 "$work" # apt-get download runs as _apt
    mkdir -p "$work"/apt/{lists/partial,archives/partial,cache,etc} "$work/debs"
    echo "deb [signed-by=$keyring] $uri bookworm-backports main" >"$work/apt/etc/sources.list"
    cat >"$work/apt/etc/apt.conf" <<CONF
Dir::Etc::SourceList "$work/apt/etc/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$work/apt/lists";
Dir::Cache "$work/apt/cache";
Dir::Cache::Archives "$work/apt/archives";
CONF
    echo "setup: QEMU 10.0: fetching ${QEMU10_PACKAGES[*]} from $uri bookworm-backports into $QEMU10_DIR"
    if ! APT_CONFIG="$work/apt/etc/apt.conf" apt-get update -q >"$work/update.log" 2>&1 ||
        grep -qE '^(E:|Err:)' "$work/update.log"; then
        cat "$work/update.log" >&2
        echo "setup: QEMU 10.0: 'apt-get update' of $uri bookworm-backports failed (the archive has no backports suite?); the tests on QEMU 10.0 need it" >&2
        return 1
    fi
    if ! (cd "$work/debs" && APT_CONFIG="$work/apt/etc/apt.conf" apt-get download -q "${QEMU10_PACKAGES[@]}"); then
        echo "setup: QEMU 10.0: 'apt-get download ${QEMU10_PACKAGES[*]}' from $uri bookworm-backports failed" >&2
        return 1
    fi
    # set -e does not apply inside a function called as a condition.
    for d in "$work"/debs/*.deb; do dpkg -x "$d" "$work/root" || return 1; done
    if ! "$work/root/usr/bin/qemu-system-x86_64" --version | head -n1 >"$work/VERSION"; then
        echo "setup: QEMU 10.0: the unpacked qemu-system-x86_64 does not run (a library missing?)" >&2
        return 1
    fi
    SUDO=()
    if [ ! -w "$(dirname "$QEMU10_DIR")" ] && [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
    "${SUDO[@]}" mkdir -p "$QEMU10_DIR" || return 1
    "${SUDO[@]}" rm -rf "$QEMU10_DIR/root" || return 1
    "${SUDO[@]}" cp -a "$work/root" "$work/VERSION" "$QEMU10_DIR/" || return 1
    echo "setup: QEMU 10.0: $(cat "$QEMU10_DIR/VERSION") in $QEMU10_DIR"
    rm -rf "$work"
    trap - EXIT
}
if [ ! -x "$QEMU10_DIR/root/usr/bin/qemu-system-x86_64" ] && ! install_qemu10; then
    if ((QEMU10_REQUIRED)); then exit 1; fi
    echo "setup: note: continuing without QEMU 10.0 (only the tests need it)" >&2
fi
