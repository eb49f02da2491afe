#!/bin/sh
# Installs Debian packages a part of the test suite needs, for the ensure_* scripts (postgres, chromium,
# the AArch64 toolchain), which first check whether what they need is already there:
#   sh scripts/apt_install.sh NAME WHAT IF_NOT_ROOT PACKAGE...
# NAME prefixes the messages, WHAT says what the packages are for, IF_NOT_ROOT is the exit status when
# this is not root on a Debian/Ubuntu system (0: go on, the tests say what is missing; 1: stop make).
set -e
name=$1 what=$2 if_not_root=$3
shift 3
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "$name: $what needs Debian's $*, and this is not root on a Debian/Ubuntu system;" \
       "install them as root: apt-get install -y $*" >&2
  exit "$if_not_root"
fi
echo "$name: installing Debian's $* for $what" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "$@" >/dev/null
