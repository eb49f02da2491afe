#!/usr/bin/env bash
# Rebuilds the web console's vendored libraries (src/zili/server/web/vendor/) from the npm
# packages pinned in package.json / package-lock.json. Needs Node and the npm registry; the page
# itself needs neither at run time.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --ignore-scripts --no-audit --no-fund
out=../src/zili/server/web/vendor
mkdir -p "$out"
# The source maps are not shipped, so their references are dropped (no request for a missing file).
sed '/^\/\/# sourceMappingURL=/d' node_modules/marked/lib/marked.esm.js > "$out/marked.esm.js"
sed '/^\/\/# sourceMappingURL=/d' node_modules/dompurify/dist/purify.min.js > "$out/purify.min.js"
cp node_modules/marked/LICENSE "$out/LICENSE.marked.md"
cp node_modules/dompurify/LICENSE "$out/LICENSE.dompurify.txt"
node -e 'const l = require("./package-lock.json").packages;
  for (const n of ["marked", "dompurify"]) console.log(`${n} ${l["node_modules/" + n].version} ${l["node_modules/" + n].integrity}`);' \
  > "$out/VERSIONS"
cat "$out/VERSIONS"
