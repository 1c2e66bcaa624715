#!/usr/bin/env bash
# A Docker engine for `flywheel package` and the Docker tests, and a base image built without a
# registry.
#
#   engine.sh start   use the engine DOCKER_HOST (or the default socket) names if one answers;
#                     otherwise start a private dockerd: data under .docker/, socket
#                     .docker/docker.sock. Installs Debian's docker.io first if dockerd is missing
#                     (root only).
#   engine.sh host    print the DOCKER_HOST to use (what `start` chose)
#   engine.sh base    build the base image flywheel-base:bookworm (Debian bookworm, minbase, with
#                     python3 and venv) with debootstrap and `docker import`, unless it exists.
#                     For machines that cannot pull python:3.11-slim from a registry.
#   engine.sh stop    stop the private dockerd
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="$ROOT/.docker"
SOCKET="unix://$STATE/docker.sock"
# containerd's sockets live under the exec root; a short path keeps them under the 108-byte limit.
EXEC_ROOT="/tmp/flywheel-docker-$(printf '%s' "$ROOT" | md5sum | cut -c1-8)"
BASE_IMAGE="${FLYWHEEL_BASE_IMAGE:-flywheel-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

answers() { DOCKER_HOST="$1" docker info >/dev/null 2>&1; }

host() {
    if [[ -n "${DOCKER_HOST:-}" ]] && answers "$DOCKER_HOST"; then echo "$DOCKER_HOST"
    elif answers "$SOCKET"; then echo "$SOCKET"
    elif answers "unix:///var/run/docker.sock"; then echo "unix:///var/run/docker.sock"
    else return 1
    fi
}

install_packages() {
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
        echo "engine.sh: $* not installed and this is not a Debian machine run as root; install" \
             "Docker and point DOCKER_HOST at its engine (or run 'make test DOCKER_TESTS=0')" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "$@" >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$@" >/dev/null; }
}

start() {
    if chosen="$(host)"; then echo "engine.sh: Docker engine at $chosen"; return; fi
    command -v dockerd >/dev/null || { echo "engine.sh: installing docker.io"; install_packages docker.io; }
    mkdir -p "$STATE" "$EXEC_ROOT"
    echo "engine.sh: starting a private dockerd (log: $STATE/dockerd.log)"
    setsid dockerd --data-root "$STATE/data" --exec-root "$EXEC_ROOT" --host "$SOCKET" \
        --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do
        if answers "$SOCKET"; then echo "engine.sh: Docker engine at $SOCKET"; return; fi
        sleep 1
    done
    echo "engine.sh: dockerd did not answer within 60 s; its log ends:" >&2
    tail -n 20 "$STATE/dockerd.log" >&2
    exit 1
}

base() {
    export DOCKER_HOST
    DOCKER_HOST="$(host)" || { echo "engine.sh: no Docker engine; run 'engine.sh start' first" >&2; exit 1; }
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "engine.sh: base image $BASE_IMAGE exists"; return
    fi
    command -v debootstrap >/dev/null || { echo "engine.sh: installing debootstrap"; install_packages debootstrap; }
    rootfs="$(mktemp -d "$STATE/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    echo "engine.sh: debootstrap bookworm (minbase + python3) from $MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$MIRROR" \
        >"$STATE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    echo "engine.sh: built $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
}

stop() {
    if [[ -f "$STATE/dockerd.pid" ]]; then
        kill "$(cat "$STATE/dockerd.pid")" 2>/dev/null || true
        echo "engine.sh: stopped the private dockerd"
    fi
}

case "${1:-}" in
    start) start ;;
    host) host || { echo "engine.sh: no Docker engine answers" >&2; exit 1; } ;;
    base) base ;;
    stop) stop ;;
    *) echo "usage: $0 start|host|base|stop" >&2; exit 2 ;;
esac
