#!/usr/bin/env bash
# graphdriver's main job, end to end, on a fresh machine (the README's quick start):
#
#   1. installs the package from this checkout if python3 cannot import it;
#   2. builds a small two-layer sample image from files any Debian machine has (a base layer
#      from /etc and a few stdlib packages; a second layer that modifies a file, deletes a file
#      and a directory with whiteouts, and replaces a directory with an opaque whiteout);
#   3. in a fresh storage root, applies the layers (apply-diff of the tar files), creates a
#      container layer on top, mounts it, writes into it, prints the changes and the diff size,
#      and exports the container's diff and lists its members.
#
# Uses the default driver selection (overlay2 as root where the kernel allows it, vfs
# otherwise) and says which. Works as root and, with vfs, as a normal user. Everything lives
# in one temp dir that is removed at the end; mounts are undone even when a step fails.
#
#   ./scripts/demo.sh            (PYTHON=... to choose the interpreter, KEEP=1 to keep the dir)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}

say() { printf '\n== %s\n' "$*"; }

# -- 1. the package ----------------------------------------------------------------------------
if ! "$PY" -c 'import graphdriver' 2>/dev/null; then
  say "installing graphdriver from $REPO"
  "$PY" -m pip install -q --disable-pip-version-check -e "$REPO" 2>&1 | grep -v '^WARNING: Running pip as' || true
  if ! "$PY" -c 'import graphdriver' 2>/dev/null; then
    echo "pip could not install it here; running from $REPO/src instead"
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c 'import graphdriver'
  fi
fi

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/graphdriver-demo.XXXXXX")
ROOT=$WORK/root
IMG=$WORK/image
SRC=$WORK/src
mkdir -p "$ROOT" "$IMG" "$SRC"

gd() { "$PY" -m graphdriver --root "$ROOT" "$@"; }
show() {  # print the command (an empty argument as '') and run it
  local shown=() a
  for a in "$@"; do if [ -z "$a" ]; then shown+=("''"); else shown+=("$a"); fi; done
  printf '$ graphdriver %s\n' "${shown[*]}"
  gd "$@"
}

cleanup() {
  local rc=$?
  set +e
  gd cleanup >/dev/null 2>&1
  # belt and braces: nothing may stay mounted below the temp dir
  if command -v findmnt >/dev/null 2>&1; then
    findmnt -rn -o TARGET | awk -v w="$WORK/" 'index($0, w) == 1' | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
  fi
  if [ -n "${KEEP:-}" ]; then
    echo "kept $WORK"
  else
    chmod -R u+rwX "$WORK" 2>/dev/null
    rm -rf --one-file-system "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 2. a sample image ---------------------------------------------------------------------------
say "building a sample image in $IMG"
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
L1=$SRC/layer1
L2=$SRC/layer2
mkdir -p "$L1/etc" "$L1/usr/lib/python3" "$L1/usr/lib" "$L1/srv/app/config" "$L1/srv/app/cache" "$L1/tmp"
chmod 1777 "$L1/tmp"
for f in os-release debian_version hostname passwd group services protocols nsswitch.conf; do
  if [ -r "/etc/$f" ] || [ -L "/etc/$f" ]; then cp -a "/etc/$f" "$L1/etc/"; fi
done
if [ -r /usr/lib/os-release ]; then cp -a /usr/lib/os-release "$L1/usr/lib/"; fi
tar -C "$STDLIB" --exclude=__pycache__ -cf - json email http logging | tar -C "$L1/usr/lib/python3" -xf -
printf '[app]\nworkers = 2\nlisten = 127.0.0.1:8000\n' > "$L1/srv/app/config/app.conf"
printf 'legacy = true\n' > "$L1/srv/app/config/old.conf"
printf '#!/bin/sh\nexec python3 -m http.server\n' > "$L1/srv/app/run.sh"
chmod 0755 "$L1/srv/app/run.sh"
ln -s config/app.conf "$L1/srv/app/app.conf"
for i in 1 2 3; do echo "cached $i" > "$L1/srv/app/cache/entry$i"; done

# layer 2 is a diff: what changes, plus OCI whiteouts for what goes away
mkdir -p "$L2/srv/app/config" "$L2/srv/app/cache" "$L2/usr/lib/python3"
printf '[app]\nworkers = 8\nlisten = 0.0.0.0:8000\n' > "$L2/srv/app/config/app.conf"   # modify
: > "$L2/srv/app/config/.wh.old.conf"                                                    # delete a file
: > "$L2/usr/lib/python3/.wh.http"                                                       # delete a directory
: > "$L2/srv/app/cache/.wh..wh..opq"                                                     # replace a directory
echo "fresh" > "$L2/srv/app/cache/fresh"
echo "1.0" > "$L2/srv/app/VERSION"                                                       # add

TAR_OPTS=(--sort=name --numeric-owner --owner="$(id -u)" --group="$(id -g)" --format=pax)
tar "${TAR_OPTS[@]}" -C "$L1" -czf "$IMG/layer1.tar.gz" .
tar "${TAR_OPTS[@]}" -C "$L2" -cf "$IMG/layer2.tar" .
ls -l "$IMG"
echo "layer2.tar:"; tar -tf "$IMG/layer2.tar" | sed 's/^/  /'

# -- 3. graphdriver ------------------------------------------------------------------------------
say "which drivers work here (root: $ROOT)"
show drivers
DRIVER=$(gd status | awk '$1 == "Driver:" {print $2}')
say "using driver: $DRIVER"

say "applying the image's layers"
# --parent says what each layer is compared with ('' = nothing: the whole tree)
show create base
show apply-diff --parent '' base "$IMG/layer1.tar.gz"
show create --parent base app
show apply-diff --parent base app "$IMG/layer2.tar"
show changes --parent base app

say "a container layer on top of the image"
show create --parent app ctr
MNT=$(gd mount ctr)
echo "mounted at $MNT"
ls -A "$MNT/srv/app" "$MNT/srv/app/cache"
cat "$MNT/srv/app/config/app.conf"
test ! -e "$MNT/srv/app/config/old.conf" && test ! -e "$MNT/usr/lib/python3/http"

say "writing into the container"
mkdir -p "$MNT/srv/app/logs"
echo "started" > "$MNT/srv/app/logs/app.log"
sed -i 's/workers = 8/workers = 16/' "$MNT/srv/app/config/app.conf"
rm "$MNT/srv/app/VERSION"
rm -r "$MNT/usr/lib/python3/logging"
chmod 0700 "$MNT/srv/app/run.sh"

say "the container's changes, and their size in bytes"
show changes --parent app ctr
show diff-size --parent app ctr
show unmount ctr

say "its diff as an OCI layer tar"
show diff --parent app -o "$WORK/ctr.tar" ctr
tar -tvf "$WORK/ctr.tar"

say "removing the layers"
show remove ctr
show remove app
show remove base
say "done (driver $DRIVER)"
