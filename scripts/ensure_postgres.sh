#!/bin/sh
# The governance tests start a throwaway PostgreSQL server (tests/governance/postgres.py); this
# installs Debian's `postgresql` package when its binaries are missing. It needs root and apt-get;
# without them it says why and the PostgreSQL half of those tests is skipped with that reason.
set -e
if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then
  exit 0
fi
exec sh "$(dirname "$0")/apt_install.sh" ensure_postgres "the PostgreSQL governance tests (skipped without it)" 0 \
  postgresql
