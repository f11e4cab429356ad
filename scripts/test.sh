#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs first (Debian packages when root, the
# package and its test extras with pip). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(btrfs-progs xfsprogs fuse-overlayfs fuse3 libarchive-tools attr umoci containers-storage
              skopeo docker-registry openssl util-linux tar gzip zstd e2fsprogs)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -e '^WARNING: Running pip as' -e 'is ignored: it is neither' || true

echo "== ruff"; python3 -m ruff check src tests bench
echo "== mypy --strict"; python3 -m mypy
echo "== pytest"; exec python3 -m pytest "$@"
