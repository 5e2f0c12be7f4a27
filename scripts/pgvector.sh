#!/usr/bin/env bash
# Install and start PostgreSQL with the pgvector extension from Debian's packages, for the
# pgvector backend's tests (.ci/run calls this). Needs root on Debian/Ubuntu; safe to rerun.
#
# pgvector comes as a binary package where the distribution has one (Debian 13, Ubuntu 24.04:
# postgresql-NN-pgvector); on Debian 12 it is built from Debian's own source package.
# Afterwards: LMFORGE_PG_DSN=postgresql://lmforge:lmforge@localhost:5432/lmforge_test
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
log() { echo "pgvector: $*"; }

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/pg_config >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt-get update -qq
    apt-get install -y -qq postgresql postgresql-server-dev-all gcc make >/dev/null
fi
pg_config=$(ls /usr/lib/postgresql/*/bin/pg_config | sort -V | tail -1)
ver=$("$pg_config" --version | sed -E 's/[^0-9]*([0-9]+).*/\1/')
if [ ! -f "$("$pg_config" --sharedir)/extension/vector.control" ]; then
    if apt-get install -y -qq "postgresql-$ver-pgvector" >/dev/null 2>&1; then
        log "installed postgresql-$ver-pgvector"
    else
        log "building pgvector from Debian's source package for PostgreSQL $ver"
        src=/etc/apt/sources.list.d/lmforge-pgvector-src.sources
        printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src"
        apt-get update -qq
        work=$(mktemp -d)
        (cd "$work" && apt-get source --download-only -qq pgvector >/dev/null 2>&1 && tar xzf pgvector_*.orig.tar.gz \
            && cd pgvector-*/ && make -s PG_CONFIG="$pg_config" OPTFLAGS="" >/dev/null && make -s install PG_CONFIG="$pg_config" >/dev/null)
        rm -rf "$work" "$src"
        apt-get update -qq || true
    fi
fi
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$ver main"; then
    pg_createcluster "$ver" main >/dev/null
fi
pg_ctlcluster "$ver" main start 2>/dev/null || true
for _ in $(seq 30); do pg_isready -q -h localhost && break; sleep 1; done
su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='lmforge'\"" | grep -q 1 \
    || su postgres -c "psql -qc \"CREATE ROLE lmforge LOGIN PASSWORD 'lmforge' SUPERUSER\""
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='lmforge_test'\"" | grep -q 1 \
    || su postgres -c "createdb -O lmforge lmforge_test"
PGPASSWORD=lmforge psql -qtA -h localhost -U lmforge lmforge_test -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
log "PostgreSQL $ver with pgvector is up: postgresql://lmforge:lmforge@localhost:5432/lmforge_test"
