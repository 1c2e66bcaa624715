#!/usr/bin/env bash
# Install Debian packages the tests need (the Docker engine, debootstrap, Chromium), quietly.
#
#   apt-install.sh "<what to do instead>" package...
#
# Only as root on a Debian machine; anywhere else it says what to install and the first argument's
# way around it, and fails. The package index is refreshed only when an install fails without it.
set -euo pipefail

instead="$1"
shift
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "$* not installed and this is not a Debian machine run as root: install them, or $instead" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# One at a time: `make test` prepares its prerequisites in parallel, and apt takes no second caller.
exec 9>/var/lib/apt/flywheel-install.lock
flock 9
apt-get install -y --no-install-recommends "$@" >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$@" >/dev/null; }
