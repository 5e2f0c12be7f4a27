#!/usr/bin/env bash
# Install and start PostgreSQL with the pgvector extension from Debian's packages, for the
# pgvector backend's tests (.ci/run calls this). Needs root on Debian/Ubuntu; safe to rerun.
#
# pgvector comes as a binary package where the distribution has one (Debian 13, Ubuntu 24.04:
# postgresql-NN-pgvector); on Debian 12 it is built from Debian's own source package, which
# needs the server headers (postgres.h, from postgresql-server-dev-NN). A machine can have the
# PostgreSQL server and pg_config without those headers, so the script checks for the header
# file itself, not for pg_config. Whatever it adds for the build (an apt source, a build folder)
# is removed on every exit path, failure included.
# Afterwards: LMFORGE_PG_DSN=postgresql://lmforge:lmforge@localhost:5432/lmforge_test
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
log() { echo "pgvector: $*"; }
die() { echo "pgvector: error: $*" >&2; exit 1; }

src_list=/etc/apt/sources.list.d/lmforge-pgvector-src.sources
work=""
cleanup() {
    [ -n "$work" ] && rm -rf "$work"
    if [ -f "$src_list" ]; then
        rm -f "$src_list"
        apt-get update -qq || true   # forget the extra source's package lists
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

apt_updated=""
apt_install() {
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    apt-get install -y -qq "$@" >/dev/null
}

# The server binaries live in /usr/lib/postgresql/NN/bin; /usr/bin/pg_config (libpq-dev) is a
# client-side copy that says nothing about the server, so it is never used here.
newest_server() { ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -1; }
if [ -z "$(newest_server)" ]; then
    log "installing PostgreSQL"
    apt_install postgresql
fi
bindir=$(dirname "$(newest_server)")
[ -x "$bindir/pg_ctl" ] || die "no PostgreSQL server found under /usr/lib/postgresql after installing it"
ver=$(basename "$(dirname "$bindir")")
pg_config="$bindir/pg_config"
if [ ! -x "$pg_config" ]; then
    log "installing postgresql-server-dev-$ver (for pg_config)"
    apt_install "postgresql-server-dev-$ver"
fi
sharedir=$("$pg_config" --sharedir)

if [ ! -f "$sharedir/extension/vector.control" ]; then
    if apt_install "postgresql-$ver-pgvector" 2>/dev/null; then
        log "installed postgresql-$ver-pgvector"
    else
        log "building pgvector from Debian's source package for PostgreSQL $ver"
        headers="$("$pg_config" --includedir-server)/postgres.h"
        if [ ! -f "$headers" ]; then
            log "installing postgresql-server-dev-$ver (no $headers)"
            apt_install "postgresql-server-dev-$ver"
        fi
        [ -f "$headers" ] || die "$headers is still missing after installing postgresql-server-dev-$ver"
        command -v gcc >/dev/null && command -v make >/dev/null || apt_install gcc make
        printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            > "$src_list"
        apt-get update -qq
        work=$(mktemp -d)
        (cd "$work" && apt-get source -o APT::Sandbox::User=root --download-only -qq pgvector >/dev/null) \
            || die "could not download Debian's pgvector source package"
        tar -C "$work" -xzf "$work"/pgvector_*.orig.tar.gz
        build=$(ls -d "$work"/pgvector-*/ | head -1)
        # with_llvm=no: the JIT bitcode is optional and would need clang at the server's version
        make -s -C "$build" PG_CONFIG="$pg_config" OPTFLAGS="" with_llvm=no >/dev/null
        make -s -C "$build" install PG_CONFIG="$pg_config" with_llvm=no >/dev/null
        [ -f "$sharedir/extension/vector.control" ] || die "pgvector built but $sharedir/extension/vector.control is missing"
        log "built and installed pgvector $(basename "$build" | sed 's/pgvector-//')"
    fi
fi

if ! pg_lsclusters -h 2>/dev/null | grep -q "^$ver main"; then
    pg_createcluster "$ver" main >/dev/null
fi
pg_ctlcluster "$ver" main start >/dev/null 2>&1 || true
for _ in $(seq 30); do pg_isready -q -h localhost && break; sleep 1; done
pg_isready -q -h localhost || die "PostgreSQL $ver did not start (see /var/log/postgresql/postgresql-$ver-main.log)"
su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='lmforge'\"" | grep -q 1 \
    || su postgres -c "psql -qc \"CREATE ROLE lmforge LOGIN PASSWORD 'lmforge' SUPERUSER\""
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='lmforge_test'\"" | grep -q 1 \
    || su postgres -c "createdb -O lmforge lmforge_test"
PGPASSWORD=lmforge psql -qtA -h localhost -U lmforge lmforge_test -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
log "PostgreSQL $ver with pgvector is up: postgresql://lmforge:lmforge@localhost:5432/lmforge_test"
