#!/usr/bin/env bash
# Debian packages the tests need: headless Chromium renders report.html and the search page;
# unshare and ip run the tests that must not reach the network inside a private network namespace.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium chromium-driver)
command -v unshare >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "the tests need: ${need[*]} (apt-get install them as root)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
