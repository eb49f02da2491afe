#!/bin/sh
# The web console's browser tests (tests/e2e/test_web_ui.py) drive Debian's Chromium through its
# chromium-driver (no browser download works offline), and a CJK font so that the Chinese
# interface's screenshots show characters, not boxes; this installs what is missing.
set -e
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && fc-list :lang=zh 2>/dev/null | grep -q .; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: the browser tests need Debian's chromium, chromium-driver and fonts-wqy-microhei;" \
       "install them as root: apt-get install -y chromium chromium-driver fonts-wqy-microhei" >&2
  exit 1
fi
echo "ensure_chromium: installing Debian's chromium, chromium-driver and a CJK font for the web console's tests" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-wqy-microhei >/dev/null
