# Shared by the scripts in this folder (source it; it changes nothing by itself).

# Prints the nats-server to use: $NATS_SERVER_BIN, Debian's /usr/sbin, /usr/local/bin or
# PATH; fails quietly when there is none.
find_nats() {
  local p
  for p in "${NATS_SERVER_BIN:-}" /usr/sbin/nats-server /usr/local/bin/nats-server "$(command -v nats-server || true)"; do
    if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return 0; fi
  done
  return 1
}

# Like find_nats, but says how to install it when there is none.
require_nats() {
  find_nats || { echo "nats-server not found: apt-get install -y nats-server" >&2; return 1; }
}
