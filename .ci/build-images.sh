#!/usr/bin/env bash
# Builds the local Docker images the test suite uses.
#
# Docker Hub is not reachable from the project machines, so nothing here pulls: the agent image is
# busybox-static imported as a rootfs, and the PostgreSQL image is a debootstrap of Debian bookworm
# with postgresql-15 plus a small entrypoint that mimics the official image's POSTGRES_* variables
# (testcontainers' PostgresContainer relies on them). The shipped agent image (agent/Dockerfile,
# with the real agent CLIs) is built as users build it, on a debootstrapped base image imported
# under the base's name. Images that already exist are kept, so a second run costs a couple of
# `docker image inspect` calls.
#
# Needs a Docker engine that answers (`bash .ci/run` starts one) and root for apt/debootstrap.
# Environment:
#   NIGHTCRIER_TEST_AGENT_IMAGE     tag of the agent image (default nightcrier-test-agent:latest)
#   NIGHTCRIER_TEST_POSTGRES_IMAGE  when set, that image is used by the tests and none is built here
#   NIGHTCRIER_DEBIAN_MIRROR        mirror for debootstrap (default http://deb.debian.org/debian)
#   NIGHTCRIER_AGENT_CLI_IMAGE      tag for the image built from agent/Dockerfile
#                                   (default nightcrier-agent:ci)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
AGENT_IMAGE=${NIGHTCRIER_TEST_AGENT_IMAGE:-nightcrier-test-agent:latest}
PG_IMAGE=nightcrier-test-postgres:15
CLI_IMAGE=${NIGHTCRIER_AGENT_CLI_IMAGE:-nightcrier-agent:ci}
MIRROR=${NIGHTCRIER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DEBIAN_FRONTEND=noninteractive

die() {
    echo "ci: ERROR: $*" >&2
    exit 1
}

APT_LOG=/var/tmp/nightcrier-apt.log
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -q >>"$APT_LOG" 2>&1 || die "apt-get update failed (log: $APT_LOG)"
        apt_updated=1
    fi
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >>"$APT_LOG" 2>&1 ||
        die "apt-get install $* failed (log: $APT_LOG)"
}

have_image() {
    docker image inspect "$1" >/dev/null 2>&1
}

docker info >/dev/null 2>&1 ||
    die "no Docker engine answers (start dockerd, e.g. by running 'bash .ci/run', then retry)"

work=$(mktemp -d /var/tmp/nightcrier-images.XXXXXX)
# --one-file-system: a failed debootstrap can leave proc/sys mounted inside the rootfs.
trap 'rm -rf --one-file-system "$work"' EXIT

build_agent_image() {
    if have_image "$AGENT_IMAGE"; then
        echo "ci: image $AGENT_IMAGE present"
        return
    fi
    echo "ci: building $AGENT_IMAGE from busybox-static"
    # The dynamically linked busybox would need a libc inside the image.
    if ! file_is_static /bin/busybox; then
        apt_install busybox-static
    fi
    local root=$work/agent
    mkdir -p "$root"/{bin,tmp,w,etc,proc,sys,dev}
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    local applet
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    tar --numeric-owner -C "$root" -cf - . |
        docker import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$AGENT_IMAGE" >/dev/null ||
        die "docker import of $AGENT_IMAGE failed"
    docker run --rm --network none "$AGENT_IMAGE" sh -c 'echo ok' | grep -qx ok ||
        die "$AGENT_IMAGE was built but does not run"
}

file_is_static() {
    [ -x "$1" ] && ! LC_ALL=C ldd "$1" >/dev/null 2>&1
}

# The entrypoint follows the official postgres image closely enough for testcontainers: it honours
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, keeps the server off TCP until the database
# exists (the readiness probe is a psql over 127.0.0.1), then runs postgres as PID 1.
write_pg_entrypoint() {
    cat >"$1" <<'EOF'
#!/bin/sh
set -eu
POSTGRES_USER="${POSTGRES_USER:-postgres}"
POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-}"
POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
PGBIN=/usr/lib/postgresql/15/bin
SOCKDIR=/var/run/postgresql

as_postgres() {
    setpriv --reuid=postgres --regid=postgres --init-groups "$@"
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA" "$SOCKDIR"
    chown postgres:postgres "$PGDATA" "$SOCKDIR"
    chmod 700 "$PGDATA"
    if [ -n "$POSTGRES_PASSWORD" ]; then
        auth=scram-sha-256
        pwfile=$(mktemp)
        printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
        chown postgres "$pwfile"
        as_postgres "$PGBIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
            --auth-local=trust --auth-host="$auth" -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
        rm -f "$pwfile"
    else
        auth=trust
        as_postgres "$PGBIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" \
            --auth-local=trust --auth-host="$auth" -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
    fi
    printf 'host all all 0.0.0.0/0 %s\nhost all all ::/0 %s\n' "$auth" "$auth" >>"$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -s -w -t 60 \
            -o "-c listen_addresses='' -k $SOCKDIR" start
        as_postgres "$PGBIN/createdb" -h "$SOCKDIR" -U "$POSTGRES_USER" "$POSTGRES_DB"
        as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -s -w -m fast stop
    fi
fi

# Durability is pointless in a throwaway test server and costs seconds per test run.
exec setpriv --reuid=postgres --regid=postgres --init-groups "$PGBIN/postgres" -D "$PGDATA" \
    -c listen_addresses='*' -c port=5432 -c unix_socket_directories="$SOCKDIR" \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off "$@"
EOF
    chmod 755 "$1"
}

build_pg_image() {
    if [ -n "${NIGHTCRIER_TEST_POSTGRES_IMAGE:-}" ]; then
        echo "ci: NIGHTCRIER_TEST_POSTGRES_IMAGE=$NIGHTCRIER_TEST_POSTGRES_IMAGE given, not building $PG_IMAGE"
        return
    fi
    if have_image "$PG_IMAGE"; then
        echo "ci: image $PG_IMAGE present"
        return
    fi
    echo "ci: building $PG_IMAGE with debootstrap (once per machine, about 1-2 min)"
    command -v debootstrap >/dev/null || apt_install debootstrap
    local root=$work/pg log=/var/tmp/nightcrier-debootstrap.log
    debootstrap --variant=minbase --include=postgresql-15 bookworm "$root" "$MIRROR" >"$log" 2>&1 || {
        tail -n 30 "$log" >&2
        die "debootstrap failed (full log: $log)"
    }
    # postgresql-15's postinst creates a default cluster; the entrypoint makes its own per container.
    rm -rf "$root/var/lib/postgresql/15" "$root/etc/postgresql/15"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    write_pg_entrypoint "$root/usr/local/bin/nightcrier-pg-entrypoint"
    tar --numeric-owner -C "$root" -cf - . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'ENTRYPOINT ["/usr/local/bin/nightcrier-pg-entrypoint"]' \
            --change 'EXPOSE 5432' \
            - "$PG_IMAGE" >/dev/null ||
        die "docker import of $PG_IMAGE failed"
    smoke_test_pg_image
}

# Runs the same readiness probe testcontainers uses, so a broken image fails here rather than as
# a timeout deep inside the test suite.
smoke_test_pg_image() {
    local cid ok=0 _
    cid=$(docker run -d --network none -e POSTGRES_USER=smoke -e POSTGRES_PASSWORD=smoke \
        -e POSTGRES_DB=smoke "$PG_IMAGE") || die "cannot start a container from $PG_IMAGE"
    for _ in $(seq 1 120); do
        if docker exec "$cid" sh -c \
            "PGPASSWORD=smoke psql -U smoke -d smoke -h 127.0.0.1 -Atc 'select 1'" 2>/dev/null | grep -qx 1; then
            ok=1
            break
        fi
        sleep 0.5
    done
    if [ "$ok" != 1 ]; then
        docker logs "$cid" 2>&1 | tail -n 20 >&2
        docker rm -f "$cid" >/dev/null 2>&1 || true
        docker rmi "$PG_IMAGE" >/dev/null 2>&1 || true
        die "$PG_IMAGE does not accept connections; image removed"
    fi
    docker rm -f "$cid" >/dev/null
}

# The shipped agent image, built from agent/Dockerfile exactly as users build it. Its base image
# cannot be pulled here, so a debootstrap of the same Debian release is imported under the base's
# name first. The tag carries a digest of agent/, so a changed recipe or version pin is rebuilt.
build_cli_image() {
    local digest base release tag
    digest=$(cd agent && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
    tag="$CLI_IMAGE-$digest"
    if have_image "$tag"; then
        echo "ci: image $tag present"
        docker tag "$tag" "$CLI_IMAGE"
        return
    fi
    base=$(sed -n 's/^ARG BASE_IMAGE=//p' agent/Dockerfile)
    release=${base#debian:}
    release=${release%-slim}
    if ! have_image "$base"; then
        echo "ci: making base image $base with debootstrap (once per machine, about 1 min)"
        command -v debootstrap >/dev/null || apt_install debootstrap
        local root=$work/base log=/var/tmp/nightcrier-debootstrap-$release.log
        debootstrap --variant=minbase "$release" "$root" "$MIRROR" >"$log" 2>&1 || {
            tail -n 30 "$log" >&2
            die "debootstrap of $release failed (full log: $log)"
        }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar --numeric-owner -C "$root" -cf - . |
            docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'CMD ["bash"]' - "$base" >/dev/null ||
            die "docker import of $base failed"
        rm -rf --one-file-system "$root"
    fi
    echo "ci: building $tag from agent/Dockerfile (about 3-5 min once per recipe)"
    # The machine reaches the npm registry through a TLS-inspecting proxy; its CA goes in through
    # the directory the Dockerfile offers for that, in a copy of the build context.
    local ctx=$work/agent-context log=/var/tmp/nightcrier-agent-build.log
    cp -R agent "$ctx"
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates/host-ca-bundle.crt"
    fi
    DOCKER_BUILDKIT=0 docker build --network host -t "$tag" "$ctx" >"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        die "docker build of agent/Dockerfile failed (full log: $log)"
    }
    docker tag "$tag" "$CLI_IMAGE"
    # Images of earlier recipes are 1 GB each; only the current one is kept.
    docker images --format '{{.Repository}}:{{.Tag}}' | grep -F "$CLI_IMAGE-" | grep -vxF "$tag" |
        xargs -r docker rmi >/dev/null 2>&1 || true
    docker run --rm --network none "$CLI_IMAGE" \
        sh -c 'claude --version && codex --version && gemini --version && kubectl version --client' ||
        die "$CLI_IMAGE was built but its CLIs do not run"
}

build_agent_image
build_pg_image
build_cli_image
