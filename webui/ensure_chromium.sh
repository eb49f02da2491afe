#!/bin/sh
# The web console's browser tests (tests/e2e/test_web_ui.py) drive Debian's Chromium through its
# chromium-driver (no browser download works offline), and a CJK font so that the Chinese
# interface's screenshots show characters, not boxes; this installs what is missing.
set -e
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && fc-list :lang=zh 2>/dev/null | grep -q .; then
  exit 0
fi
exec sh "$(dirname "$0")/../scripts/apt_install.sh" ensure_chromium "the web console's browser tests" 1 \
  chromium chromium-driver fonts-wqy-microhei
