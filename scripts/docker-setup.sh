#!/usr/bin/env bash
# Prepare a Docker engine and the platform's base images on this machine. Idempotent:
# every step is skipped when its result already exists, so running it twice costs ~1 s.
# Quiet on success (FAL_SETUP_VERBOSE=1 tells each step); on failure it says which step
# failed and why on stderr, and exits non-zero.
#
#   1. install Debian's docker.io (+ debootstrap) when dockerd is missing, and its
#      docker-registry (the tests push to a local one; never started here)
#   2. start `dockerd --iptables=false --bridge=none` in the background when no engine answers
#      (this network has no bridge/NAT: builds and containers use the host network)
#   3. build the base images OFFLINE (images cannot be pulled here): debootstrap a minimal
#      Debian with python3 from the same mirror apt uses, then `docker import` it
#
# Environment: FAL_BASE_CPU_IMAGE (default fal-base-cpu:bookworm), FAL_BASE_GPU_IMAGE
# (default fal-base-gpu:bookworm, tagged onto the CPU base: a CUDA runtime base cannot be
# pulled here), DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (read from apt's sources),
# DOCKERD_LOG (/var/log/dockerd.log).
set -euo pipefail

CPU_IMAGE="${FAL_BASE_CPU_IMAGE:-fal-base-cpu:bookworm}"
GPU_IMAGE="${FAL_BASE_GPU_IMAGE:-fal-base-gpu:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
# Debian's own client: it has BuildKit built in (build secrets need it); a newer client
# elsewhere on PATH may need the buildx plugin.
DOCKER=/usr/bin/docker

log() { if [ "${FAL_SETUP_VERBOSE:-0}" = 1 ]; then echo "docker-setup: $*" >&2; fi; }
die() { echo "docker-setup: ERROR: $*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_packages() {
    local missing=()
    [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]} from Debian"
    as_root apt-get update -qq >/dev/null \
        || die "apt-get update failed: check the network and /etc/apt/sources.list*"
    # No init system here: keep the package scripts from trying to start the service.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 as_root apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" tini >/dev/null \
        || die "could not install ${missing[*]} with apt-get; install them by hand"
}

engine_up() { "$DOCKER" info >/dev/null 2>&1; }

start_engine() {
    engine_up && return 0
    log "starting dockerd (log: $DOCKERD_LOG)"
    local pid
    pid=$(as_root bash -c "nohup /usr/sbin/dockerd --iptables=false --bridge=none \
        >>'$DOCKERD_LOG' 2>&1 </dev/null & echo \$!")
    for _ in $(seq 1 120); do
        engine_up && { log "engine is up"; return 0; }
        # Died at once (no privileges, storage driver, a stale pid file): say so now.
        as_root kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    echo "docker-setup: ERROR: dockerd did not start; the end of $DOCKERD_LOG:" >&2
    tail -n 20 "$DOCKERD_LOG" >&2 || true
    die "fix the cause above (dockerd needs root and a kernel with overlayfs or vfs), then" \
        "run bash scripts/docker-setup.sh again"
}

debian_mirror() {
    # The mirror apt already uses (deb822 or one-line sources), so debootstrap reaches it.
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -v security | head -n1 || true)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -n1)
    echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
    if "$DOCKER" image inspect "$CPU_IMAGE" >/dev/null 2>&1; then
        log "$CPU_IMAGE exists (cached)"
        return 0
    fi
    local root mirror
    root=$(mktemp -d /tmp/fal-rootfs.XXXXXX)
    trap 'as_root rm -rf "$root"' RETURN
    mirror=$(debian_mirror)
    log "debootstrap $SUITE from $mirror (about 40 s)"
    as_root debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates,tini "$SUITE" "$root" "$mirror" >/dev/null
    # Smaller image, and no apt lists that would go stale inside it.
    as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    as_root tar -C "$root" -c . | "$DOCKER" import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$CPU_IMAGE" >/dev/null
    log "built $CPU_IMAGE"
}

tag_gpu_base() {
    "$DOCKER" image inspect "$GPU_IMAGE" >/dev/null 2>&1 && return 0
    log "NOTE: $GPU_IMAGE is the CPU base retagged: a CUDA runtime image cannot be pulled" \
        "here; build one and set FAL_BASE_GPU_IMAGE on a real GPU machine"
    "$DOCKER" tag "$CPU_IMAGE" "$GPU_IMAGE"
}

install_packages
start_engine
build_base
tag_gpu_base
log "ready: $("$DOCKER" version --format '{{.Server.Version}}')"
