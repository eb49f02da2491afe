#!/bin/sh
# The governance tests start a throwaway PostgreSQL server (tests/governance/postgres.py); this
# installs Debian's `postgresql` package when its binaries are missing. It needs root and apt-get;
# without them it says why and the PostgreSQL half of those tests is skipped with that reason.
set -e
if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_postgres: PostgreSQL is not installed and this is not root on a Debian/Ubuntu system;" \
       "the PostgreSQL governance tests will be skipped." >&2
  exit 0
fi
echo "ensure_postgres: installing Debian's postgresql package for the governance tests" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends postgresql >/dev/null
