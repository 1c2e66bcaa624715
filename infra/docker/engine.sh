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
#                     For machines that cannot pull python:3.11-slim from a registry. The
#                     Debian mirror is DEBIAN_MIRROR if set, else the one this machine's apt is
#                     configured with (so a local mirror or proxy is used as apt uses it), else
#                     debootstrap's own default, with a warning.
#   engine.sh mirror  print that mirror
#   engine.sh stop    stop the private dockerd
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="$ROOT/.docker"
SOCKET="unix://$STATE/docker.sock"
# containerd's sockets live under the exec root; a short path keeps them under the 108-byte limit.
EXEC_ROOT="/tmp/flywheel-docker-$(printf '%s' "$ROOT" | md5sum | cut -c1-8)"
BASE_IMAGE="${FLYWHEEL_BASE_IMAGE:-flywheel-base:bookworm}"
SUITE=bookworm

answers() { DOCKER_HOST="$1" docker info >/dev/null 2>&1; }

host() {
    if [[ -n "${DOCKER_HOST:-}" ]] && answers "$DOCKER_HOST"; then echo "$DOCKER_HOST"
    elif answers "$SOCKET"; then echo "$SOCKET"
    elif answers "unix:///var/run/docker.sock"; then echo "unix:///var/run/docker.sock"
    else return 1
    fi
}

install_packages() {
    "$ROOT/infra/apt-install.sh" "point DOCKER_HOST at a Docker engine (or run 'make test DOCKER_TESTS=0')" "$@"
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

# The first archive apt is configured with for $SUITE's main component, from one-line sources
# (deb [options] URI suite components...) and deb822 .sources files (Types/URIs/Suites/Components).
apt_mirror() {
    command -v apt-config >/dev/null || return 1
    local list parts
    eval "$(apt-config shell list Dir::Etc::sourcelist/f parts Dir::Etc::sourceparts/d)"
    {
        [[ -f "$list" ]] && cat "$list"
        for file in "$parts"/*.list; do [[ -f "$file" ]] && cat "$file"; done
    } | awk -v suite="$SUITE" '
        /^[ \t]*deb[ \t]/ {
            sub(/\[[^]]*\][ \t]*/, "")
            if ($3 == suite) for (i = 4; i <= NF; i++) if ($i == "main") { print $2; exit }
        }' | head -n1 | grep . && return
    for file in "$parts"/*.sources; do [[ -f "$file" ]] && cat "$file" && echo; done | awk -v suite="$SUITE" '
        function flush() {
            if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && (" " components " ") ~ / main /) {
                split(uris, first, " "); print first[1]; found = 1; exit
            }
            types = uris = suites = components = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
        /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
        /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
        /^Components:/ { sub(/^Components:[ \t]*/, ""); components = $0 }
        END { if (!found) flush() }' | head -n1 | grep .
}

# The same from apt's own resolved view ("500 URI suite/main arch Packages" then "release
# ...,o=Debian,..."), which also covers source formats the parsers above do not read. A host on
# another Debian release still names a Debian archive, and Debian's archives carry every supported
# suite: its main archive is the fallback.
apt_policy_mirror() {
    command -v apt-cache >/dev/null || return 1
    apt-cache policy 2>/dev/null | awk -v suite="$SUITE" '
        $1 ~ /^-?[0-9]+$/ && NF >= 3 { uri = $2; split($3, dist, "/"); next }
        /^ *release / && /o=Debian,/ && dist[2] == "main" {
            if (dist[1] == suite) { exact = uri; exit }
            if (fallback == "" && dist[1] !~ /-(security|updates|backports)$/) fallback = uri
        }
        END { if (exact != "") print exact; else if (fallback != "") print fallback }' | grep .
}

mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
    apt_mirror || apt_policy_mirror || {
        echo "engine.sh: no Debian archive in this machine's apt sources (set DEBIAN_MIRROR to" \
             "choose one); debootstrap uses its own default. What apt knows:" >&2
        apt-cache policy 2>&1 | grep -E '^ *-?[0-9]+ ' | head -n 10 >&2 || true
    }
}

base() {
    export DOCKER_HOST
    DOCKER_HOST="$(host)" || { echo "engine.sh: no Docker engine; run 'engine.sh start' first" >&2; exit 1; }
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "engine.sh: base image $BASE_IMAGE exists"; return
    fi
    command -v debootstrap >/dev/null || { echo "engine.sh: installing debootstrap"; install_packages debootstrap; }
    local source
    source="$(mirror)"
    # apt's proxy, where apt has one and the environment does not.
    if [[ -z "${http_proxy:-}" ]] && command -v apt-config >/dev/null; then
        local proxy=""
        eval "$(apt-config shell proxy Acquire::http::Proxy)"
        [[ -n "$proxy" ]] && export http_proxy="$proxy"
    fi
    mkdir -p "$STATE"  # start made it, unless an engine was already running
    rootfs="$(mktemp -d "$STATE/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    echo "engine.sh: debootstrap $SUITE (minbase + python3) from ${source:-the default mirror of debootstrap}"
    # An empty mirror argument is left out: debootstrap then takes its own.
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$rootfs" ${source:+"$source"} \
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
    mirror) mirror ;;
    stop) stop ;;
    *) echo "usage: $0 start|host|base|mirror|stop" >&2; exit 2 ;;
esac
