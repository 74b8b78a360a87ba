#!/usr/bin/env bash
# Builds libsqlite3.so.0 from the SQLite 3.34.0 amalgamation, the oldest SQLite the project supports
# in practice (Debian 11's, RHEL 9's), so the SQLite tests can run against it with LD_LIBRARY_PATH.
# Prints the directory holding the library.
#
# The source comes from the npm package sqlite3@5.0.2, which bundles
# deps/sqlite-autoconf-3340000.tar.gz; `npm pack` is the only network access. The result is cached
# under /var/cache/nightcrier-ci and reused while present; a half-finished build is simply redone.
set -euo pipefail

VERSION=3340000
NPM_PACKAGE=sqlite3@5.0.2
CACHE=${NIGHTCRIER_CI_CACHE:-/var/cache/nightcrier-ci}
DIR=$CACHE/sqlite-$VERSION
LIB=$DIR/lib/libsqlite3.so.0

say() {
    echo "build-old-sqlite: $*" >&2
}

if [ -f "$LIB" ]; then
    echo "$DIR/lib"
    exit 0
fi

command -v npm >/dev/null || { say "npm is needed to fetch $NPM_PACKAGE"; exit 1; }
command -v cc >/dev/null || { say "a C compiler (cc) is needed"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "fetching $NPM_PACKAGE"
(cd "$work" && npm pack --silent --loglevel=error "$NPM_PACKAGE" >/dev/null)
tar -xzf "$work"/sqlite3-5.0.2.tgz -C "$work" package/deps/sqlite-autoconf-$VERSION.tar.gz
tar -xzf "$work"/package/deps/sqlite-autoconf-$VERSION.tar.gz -C "$work"
src=$work/sqlite-autoconf-$VERSION

# The options Debian builds its libsqlite3 with, as far as CPython's _sqlite3 can reach them:
# sqlite3_deserialize/serialize (3.11+ Connection.serialize) only exist with ENABLE_DESERIALIZE
# before 3.36, and JSON1 is not built in before 3.38.
say "compiling the $VERSION amalgamation"
mkdir -p "$work/lib"
cc -O2 -w -fPIC -shared -o "$work/lib/libsqlite3.so.0" -Wl,-soname,libsqlite3.so.0 \
    -DSQLITE_THREADSAFE=1 -DSQLITE_ENABLE_DESERIALIZE -DSQLITE_ENABLE_JSON1 \
    -DSQLITE_ENABLE_FTS3 -DSQLITE_ENABLE_FTS5 -DSQLITE_ENABLE_RTREE \
    -DSQLITE_ENABLE_COLUMN_METADATA -DSQLITE_ENABLE_UNLOCK_NOTIFY -DSQLITE_ENABLE_DBSTAT_VTAB \
    -DSQLITE_SECURE_DELETE -DSQLITE_MAX_VARIABLE_NUMBER=250000 \
    "$src/sqlite3.c" -lpthread -ldl -lm

mkdir -p "$CACHE"
rm -rf "$DIR.tmp"
mkdir -p "$DIR.tmp"
mv "$work/lib" "$DIR.tmp/lib"
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"
say "built $LIB"
echo "$DIR/lib"
