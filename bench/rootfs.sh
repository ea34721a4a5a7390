#!/usr/bin/env bash
# Build a realistic container rootfs from Debian packages into bench/.cache/rootfs (or $1), the
# input of bench/build_bench.py. RECIPES §2b: resolve dependencies with `apt-cache depends
# --recurse` (keeping Pre-Depends: python3-minimal is one), `apt-get download` the .debs and
# `dpkg-deb -x` each one; no debootstrap, chroot or maintainer scripts. perl, dpkg, tar and the
# mime packages are skipped (as in the recipe); everything else is a real package's files.
#
# Result (bookworm, 2025): ~145 MB, ~5100 entries, ~4200 regular files: python3 + pip, git,
# curl, coreutils, dash. Idempotent: a finished rootfs is reused while the package list is the
# same (delete bench/.cache/rootfs to rebuild). Needs the apt package lists (`apt-get update`).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$(realpath -m "${1:-$HERE/.cache/rootfs}")
PKGS=${ROOTFS_PACKAGES:-"python3 python3-pip git curl ca-certificates dash coreutils"}
STAMP=$OUT.packages

if [ -d "$OUT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PKGS" ]; then
    echo "rootfs: reusing $OUT ($(du -s --apparent-size -BM "$OUT" | cut -f1), $(find "$OUT" | wc -l) entries)"
    exit 0
fi

mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d "$(dirname "$OUT")/.rootfs-build.XXXXXX")   # same filesystem: mv is a rename
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/root"

resolve() {
    # shellcheck disable=SC2086
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances $PKGS 2> /dev/null | grep -E '^[a-z0-9]' | sort -u
}
resolve > "$WORK/list" || true
if ! [ -s "$WORK/list" ] || ! grep -qx python3-minimal "$WORK/list"; then
    echo "rootfs: apt lists missing or stale, running apt-get update"
    apt-get update -qq
    resolve > "$WORK/list"
fi

echo "rootfs: downloading $(wc -l < "$WORK/list") packages for: $PKGS"
# Virtual packages in the list (e.g. <python3:any>) are filtered by the grep above; names that are
# not downloadable on their own are retried one by one so a single odd name does not fail all.
if ! (cd "$WORK/debs" && xargs apt-get download -qq < "$WORK/list" > /dev/null 2>&1); then
    while read -r p; do
        (cd "$WORK/debs" && apt-get download -qq "$p" > /dev/null 2>&1) || echo "rootfs: skipped $p"
    done < "$WORK/list"
fi

n=0
for d in "$WORK"/debs/*.deb; do
    case ${d##*/} in
        perl*|libperl*|dpkg_*|tar_*|install-info*|mailcap*|mime-support*|media-types*) continue ;;
    esac
    dpkg-deb -x "$d" "$WORK/root"
    n=$((n + 1))
done
mkdir -p "$WORK/root"/{proc,sys,dev,tmp,root}
chmod 1777 "$WORK/root/tmp"
[ -x "$WORK/root/usr/bin/python3" ] || { echo "rootfs: no usr/bin/python3 in result" >&2; exit 1; }

rm -rf "$OUT" "$STAMP"
mv "$WORK/root" "$OUT"
printf '%s' "$PKGS" > "$STAMP"
echo "rootfs: $OUT from $n packages: $(du -s --apparent-size -BM "$OUT" | cut -f1)," \
     "$(find "$OUT" | wc -l) entries, $(find "$OUT" -type f | wc -l) regular files"
