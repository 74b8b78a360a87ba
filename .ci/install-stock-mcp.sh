#!/usr/bin/env bash
# Installs the stock kubernetes-mcp-server (the upstream Go server, without event subscriptions) from
# the npm registry into a cache directory, once; prints the path of its executable.
# Safe to re-run: an existing installation of the pinned version is reused.
set -euo pipefail

VERSION=0.0.67
DIR=${NIGHTCRIER_TOOLS_DIR:-/var/cache/nightcrier-tools}/kubernetes-mcp-server-$VERSION
BIN=$DIR/node_modules/.bin/kubernetes-mcp-server

if [ ! -x "$BIN" ]; then
    command -v npm >/dev/null || {
        echo "install-stock-mcp: npm is needed to install kubernetes-mcp-server@$VERSION" >&2
        exit 1
    }
    mkdir -p "$DIR"
    # A private prefix: nothing global changes, and a half-finished install is simply redone.
    npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error \
        "kubernetes-mcp-server@$VERSION" >&2
fi
"$BIN" --version >/dev/null 2>&1 || true
echo "$BIN"
