#!/usr/bin/env bash
# The quick-start demo (`make demo`): build a nydusfs image from a generated sample tree, inspect
# it, verify it, show that the build is reproducible and that a corrupted blob is caught, then
# mount it lazily and show that reading one file fetched only that file's chunks. Then the
# registry part: start a local docker-registry, build a multi-layer OCI image from Debian
# packages (bench/oci_images.py: umoci, one layer per group of packages plus one that deletes,
# changes and adds files), push it with skopeo, `nydusfs convert` it, mount the result straight
# from the registry, start python3 from the mount, and show how little of the image was fetched.
# Exits non-zero on the first step that does not behave as described. Needs the virtualenv and
# the packages `make setup` installs (the registry part needs root and the apt package lists;
# without root it is skipped, saying so). Everything it writes lives in a temporary directory;
# mounts are unmounted and the registry stopped (by PID) on exit, also when interrupted.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NYDUSFS=${NYDUSFS:-$ROOT/.venv/bin/nydusfs}
PY=$ROOT/.venv/bin/python
[ -x "$NYDUSFS" ] || { echo "demo: $NYDUSFS not found; run 'make setup' first" >&2; exit 1; }

T=$(mktemp -d "${TMPDIR:-/tmp}/nydusfs-demo.XXXXXX")
REG_PID=""
cleanup() {
    local m
    for m in "$T/rmnt" "$T/mnt"; do
        if mountpoint -q "$m" 2> /dev/null; then
            "$NYDUSFS" umount "$m" > /dev/null 2>&1 || umount -l "$m" 2> /dev/null || true
        fi
    done
    if [ -n "$REG_PID" ]; then
        kill "$REG_PID" 2> /dev/null || true
        for _ in $(seq 50); do kill -0 "$REG_PID" 2> /dev/null || break; sleep 0.1; done
        kill -9 "$REG_PID" 2> /dev/null || true
        wait "$REG_PID" 2> /dev/null || true
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B="" N=""; fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
fail() { echo "demo: FAILED: $*" >&2; exit 1; }
# Show a command's output, at most $1 lines (captured first: no SIGPIPE under pipefail).
show() {
    local max=$1; shift
    "$@" > "$T/out" || fail "$* (exit $?)"
    head -n "$max" "$T/out" | sed 's/^/    /'
    local n; n=$(wc -l < "$T/out")
    if [ "$n" -gt "$max" ]; then echo "    ... ($((n - max)) more lines)"; fi
}

step "Generating a sample tree in $T/src"
S=$T/src
mkdir -p "$S"/{etc,usr/bin,usr/lib/demo,usr/share/doc/demo,usr/share/doc/demo-extra,var/empty,tmp}
chmod 1777 "$S/tmp"
printf 'demo\n' > "$S/etc/hostname"
printf 'PRETTY_NAME="nydusfs demo"\nID=demo\n' > "$S/etc/os-release"
head -c $((3 * 1024 * 1024 + 12345)) /dev/urandom > "$S/usr/bin/tool"   # 3+ MiB: 4 chunks
chmod 755 "$S/usr/bin/tool"
ln "$S/usr/bin/tool" "$S/usr/bin/tool-alias"                            # hardlink: one inode
seq 1 300000 > "$S/usr/share/doc/demo/numbers.txt"                        # compresses well
head -c $((2 * 1024 * 1024)) /dev/urandom > "$S/usr/lib/demo/libdemo.so.1"
ln -s libdemo.so.1 "$S/usr/lib/demo/libdemo.so"                           # symlink
cp "$S/usr/lib/demo/libdemo.so.1" "$S/usr/lib/demo/libdemo-copy.so.1"    # duplicate data
for d in demo demo-extra; do                                              # duplicate small files
    printf 'Licensed under the Apache License, Version 2.0.\n' > "$S/usr/share/doc/$d/COPYING"
done
: > "$S/var/empty/.keep"                                                  # empty file
find "$S" -mindepth 1 -printf '%y %M %10s  %P\n' | sort -k4 | sed 's/^/    /'

step "nydusfs build $S -o $T/image --json"
"$NYDUSFS" build "$S" -o "$T/image" --json > "$T/summary.json" || fail "build"
"$PY" - "$T/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
mib = lambda n: f"{n / 1048576:.2f} MiB"
print(f"    root digest       {s['root_digest']}")
print(f"    bootstrap sha256  {s['bootstrap_sha256']}")
print(f"    inodes            {s['inodes']} ({s['files']} files, {s['directories']} directories)")
print(f"    chunks            {s['chunks']} ({s['chunks_new']} stored in new blobs)")
print(f"    bytes in / out    {mib(s['bytes_in'])} -> {mib(s['bytes_out'])}")
print(f"    saved by dedup    {mib(s['dedup_saved_bytes'])}")
for b in s["blobs"]:
    print(f"    blob              {b['digest']}  {b['size']} bytes{'  (new)' if b['new'] else ''}")
print(f"    build time        {s['seconds']:.2f} s")
if s["dedup_saved_bytes"] < 2 * 1048576:
    sys.exit("demo: expected the duplicated 2 MiB library to be stored once")
EOF
ls -l "$T/image" "$T/image/blobs" | sed 's/^/    /'

step "nydusfs inspect $T/image/bootstrap"
show 40 "$NYDUSFS" inspect "$T/image/bootstrap"

step "nydusfs inspect $T/image/bootstrap /usr/bin/tool   (the hardlinked file)"
show 40 "$NYDUSFS" inspect "$T/image/bootstrap" /usr/bin/tool

step "nydusfs check $T/image/bootstrap --blob-dir $T/image/blobs"
show 20 "$NYDUSFS" check "$T/image/bootstrap" --blob-dir "$T/image/blobs"
echo "    OK: every offset, the whole Merkle tree and every chunk digest verified"

step "Reproducibility: building the same tree again"
"$NYDUSFS" build "$S" -o "$T/image2" > /dev/null || fail "second build"
cmp "$T/image/bootstrap" "$T/image2/bootstrap" || fail "bootstraps differ"
diff <(cd "$T/image/blobs" && ls) <(cd "$T/image2/blobs" && ls) > /dev/null || fail "blob names differ"
for b in "$T"/image/blobs/*; do cmp "$b" "$T/image2/blobs/${b##*/}" || fail "blob ${b##*/} differs"; done
echo "    OK: bootstrap and blobs are byte-identical"

step "Chunk dictionary: version 2 of the tree (one file edited) built against version 1"
cp -a "$S" "$T/src2"
echo "one more line" >> "$T/src2/usr/bin/tool"          # changes only the file's last chunk
printf 'demo-v2\n' > "$T/src2/etc/hostname"
"$NYDUSFS" build "$T/src2" -o "$T/image-v2" --chunk-dict "$T/image/bootstrap" --json \
    > "$T/summary2.json" || fail "build with --chunk-dict"
"$PY" - "$T/summary2.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
new = [b for b in s["blobs"] if b["new"]]
print(f"    chunks {s['chunks']}, of which new {s['chunks_new']}; new blob {new[0]['size']} bytes, "
      f"{len(s['blobs']) - len(new)} blob(s) reused from version 1")
if s["chunks_new"] > 2:
    sys.exit("demo: expected only the two edited chunks to be stored again")
EOF
show 5 "$NYDUSFS" check "$T/image-v2/bootstrap" --blob-dir "$T/image-v2/blobs"

step "Integrity: flipping one byte in a copy of the blob"
cp -r "$T/image/blobs" "$T/bad-blobs"
"$PY" - "$T"/bad-blobs/* <<'EOF'
import sys
for path in sys.argv[1:]:
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(len(data) // 2)
        f.write(bytes([data[len(data) // 2] ^ 0xFF]))
EOF
if "$NYDUSFS" check "$T/image/bootstrap" --blob-dir "$T/bad-blobs" > "$T/out" 2> "$T/err"; then
    fail "check accepted a corrupted blob"
fi
sed 's/^/    /' "$T/err"
echo "    OK: corruption detected (non-zero exit, clear message)"

step "Lazy mount: nydusfs mount --background, read one file, see what was fetched"
mkdir -p "$T/mnt"
"$NYDUSFS" mount "$T/image/bootstrap" "$T/mnt" --background | sed 's/^/    /'
ls -l "$T/mnt/usr/bin" | sed 's/^/    /'
cmp "$T/mnt/etc/os-release" "$S/etc/os-release" || fail "mounted file differs"
echo "    cat /etc/os-release through the mount: $(head -n 1 "$T/mnt/etc/os-release")"
"$NYDUSFS" stat "$T/mnt" --json > "$T/stat.json" || fail "nydusfs stat"
"$PY" - "$T/stat.json" "$T/image/blobs" <<'EOF'
import json, os, sys
s = json.load(open(sys.argv[1]))
blob = sum(os.path.getsize(os.path.join(sys.argv[2], b)) for b in os.listdir(sys.argv[2]))
fetched = s["backend_counters"]["bytes_read"]
print(f"    fetched {fetched} of {blob} blob bytes ({100 * fetched / blob:.2f}%), "
      f"{s['read']['chunks_fetched']} chunk(s), every one verified")
assert 0 < fetched < blob / 10, "a lazy mount fetched too much"
EOF
"$NYDUSFS" umount "$T/mnt"
echo "    OK: unmounted"

if [ "$(id -u)" -ne 0 ]; then
    printf '\n%sdemo finished: build, inspect, check, reproducibility, integrity and a lazy mount all OK%s\n' "$B" "$N"
    echo "(registry part skipped: building the sample OCI image keeps package file owners, which needs root)"
    exit 0
fi

step "A local registry: docker-registry (distribution) on a free loopback port"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
mkdir -p "$T/registry"
printf '%s\n' "version: 0.1" "log: {level: warn, accesslog: {disabled: true}}" \
    "storage: {filesystem: {rootdirectory: $T/registry/data}}" "http: {addr: '$REG'}" \
    > "$T/registry/config.yml"
docker-registry serve "$T/registry/config.yml" > "$T/registry/log" 2>&1 &
REG_PID=$!
"$PY" - "http://$REG/v2/" <<'PYEOF' || { tail -n 5 "$T/registry/log" >&2; fail "docker-registry did not start"; }
import sys, time, urllib.request
end = time.monotonic() + 30
while time.monotonic() < end:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
PYEOF
echo "    docker-registry pid $REG_PID, listening on $REG"

step "A multi-layer OCI image from Debian packages (python3: apt-get download, dpkg-deb -x, umoci)"
"$PY" "$ROOT/bench/oci_images.py" --packages python3 --name demo --tag demo --cache "$T/oci" \
    > "$T/oci.out" 2> "$T/oci.err" || { sed 's/^/    /' "$T/oci.err" >&2; fail "building the OCI image"; }
sed 's/^oci_images: /    /' "$T/oci.err"
LAYOUT=$(cat "$T/oci.out")

# Layers of an image manifest (fetched from the registry with skopeo) and their total size.
layers() {
    skopeo inspect --raw --tls-verify=false "docker://$1" > "$T/manifest.json" \
        || fail "skopeo inspect $1"
    "$PY" - "$T/manifest.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
for layer in m["layers"]:
    print(f"    {layer['digest'][:23]}...  {layer['size']:>10} bytes  {layer['mediaType']}")
print(f"    total {sum(x['size'] for x in m['layers']) / 1e6:.1f} MB in {len(m['layers'])} layers")
PYEOF
}

step "skopeo copy ${LAYOUT##*/} docker://$REG/demo/python:oci"
skopeo copy -q --dest-tls-verify=false "$LAYOUT" "docker://$REG/demo/python:oci" || fail "skopeo copy"
layers "$REG/demo/python:oci"

step "nydusfs convert $REG/demo/python:oci $REG/demo/python:nydus"
"$NYDUSFS" convert "$REG/demo/python:oci" "$REG/demo/python:nydus" --json > "$T/convert.json" \
    || fail "nydusfs convert"
"$PY" - "$T/convert.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
for k, v in s.items():
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        print(f"    {k:22} {v}")
PYEOF
layers "$REG/demo/python:nydus"
cp "$T/manifest.json" "$T/nydus-manifest.json"

step "nydusfs mount $REG/demo/python:nydus (backend registry, empty disk cache); python3 from it"
mkdir -p "$T/rmnt"
printf 'cache: {dir: %s}\n' "$T/cache" > "$T/registry-mount.yaml"
"$NYDUSFS" mount "$REG/demo/python:nydus" "$T/rmnt" --config "$T/registry-mount.yaml" \
    --background | sed 's/^/    /'
mountpoint -q "$T/rmnt" || fail "$T/rmnt is not a mount point"
[ ! -e "$T/rmnt/usr/share/doc" ] || fail "usr/share/doc, deleted by the last layer, is there"
grep -q "edited by the image's last layer" "$T/rmnt/etc/python3.11/sitecustomize.py" \
    || fail "the last layer's change to etc/python3.11/sitecustomize.py is missing"
echo "    whiteouts applied (no usr/share/doc); the last layer's edit and /app/main.py are there"
out=$(chroot "$T/rmnt" /usr/bin/python3 -B /app/main.py) || fail "python3 from the mount"
[ "$out" = ready ] || fail "python3 printed '$out', expected 'ready'"
echo "    chroot $T/rmnt /usr/bin/python3 -B /app/main.py  ->  $out"
"$NYDUSFS" stat "$T/rmnt" --json > "$T/rstat.json" || fail "nydusfs stat"
"$PY" - "$T/rstat.json" "$T/nydus-manifest.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
image = sum(x["size"] for x in json.load(open(sys.argv[2]))["layers"])
fetched = s["backend_counters"]["bytes_read"]
print(f"    python3 read {s['read']['bytes_read'] / 1e6:.1f} MB through the mount; "
      f"{fetched / 1e6:.1f} MB fetched from the registry = {100 * fetched / image:.1f}% "
      f"of the {image / 1e6:.1f} MB image")
if not 0 < fetched < image / 2:
    sys.exit("demo: a lazy mount should fetch a small part of the image")
PYEOF
"$NYDUSFS" umount "$T/rmnt" || fail "nydusfs umount"
echo "    OK: unmounted"

printf '\n%sdemo finished: build, inspect, check, reproducibility, integrity, a lazy mount, and convert + mount from a registry all OK%s\n' "$B" "$N"
