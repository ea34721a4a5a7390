#!/usr/bin/env bash
# The quick-start demo (`make demo`): build a nydusfs image from a generated sample tree, inspect
# it, verify it, show that the build is reproducible and that a corrupted blob is caught, then
# mount it lazily and show that reading one file fetched only that file's chunks. Then the
# registry part: start a local docker-registry, build a multi-layer OCI image from Debian
# packages (bench/oci_images.py: umoci, one layer per group of packages plus one that deletes,
# changes and adds files), push it with skopeo, `nydusfs convert` it, mount the result straight
# from the registry, start a python3 container from it with runc (on an overlay with a tmpfs
# upper), and show how little of the image was fetched. Then the local P2P cluster: a registry,
# `dfagent supernode` and three `dfagent peer`s, each in its own network namespace with a
# shaped link (bench/netlab.py; plain loopback ports where namespaces cannot be made), the
# image mounted on every peer with `backend: dragonfly`, the container started on each, and a
# report of the bytes that came from the registry and from peers.
# Exits non-zero on the first step that does not behave as described. Needs the virtualenv and
# the packages `make setup` installs (the registry and cluster parts need root and the apt
# package lists; without root they are skipped, saying so). Everything it writes lives in a
# temporary directory; containers are deleted, mounts unmounted, processes stopped by PID and
# the namespaces deleted on exit, also when interrupted.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NYDUSFS=${NYDUSFS:-$ROOT/.venv/bin/nydusfs}
PY=$ROOT/.venv/bin/python
[ -x "$NYDUSFS" ] || { echo "demo: $NYDUSFS not found; run 'make setup' first" >&2; exit 1; }

T=$(mktemp -d "${TMPDIR:-/tmp}/nydusfs-demo.XXXXXX")
LAB_PREFIX=dff-demo$$-
LAB_UP=""
PIDS=()          # processes we started (registries, supernode, peers, mount daemons), by PID
MOUNTS=()        # overlays and tmpfs we mounted, in order (unmounted in reverse)
NYDUS_MOUNTS=()  # nydusfs mounts of the cluster part (unmounted after the overlays)
CONTAINERS=()    # runc containers, deleted by id
stop_pid() {
    local pid=$1
    kill "$pid" 2> /dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2> /dev/null || true
    wait "$pid" 2> /dev/null || true
}
cleanup() {
    local i m
    trap '' INT TERM HUP
    for i in "${CONTAINERS[@]}"; do
        runc --root "$T/runc" delete --force "$i" > /dev/null 2>&1 || true
    done
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do        # overlays and their tmpfs first
        m=${MOUNTS[i]}
        if mountpoint -q "$m" 2> /dev/null; then umount "$m" 2> /dev/null || umount -l "$m" || true; fi
    done
    for m in "${NYDUS_MOUNTS[@]}" "$T/rmnt" "$T/mnt"; do  # then the FUSE mounts below them
        if mountpoint -q "$m" 2> /dev/null; then
            "$NYDUSFS" umount "$m" > /dev/null 2>&1 || umount -l "$m" 2> /dev/null || true
        fi
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    if [ -n "$REG_PID" ]; then stop_pid "$REG_PID"; fi
    if [ -n "$LAB_UP" ]; then "$PY" "$ROOT/bench/netlab.py" down --prefix "$LAB_PREFIX" || true; fi
    rm -rf "$T"
}
REG_PID=""
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

# run_container LOWER DIR ID: runc runs the image's Cmd (from $T/image-config.json) on an overlay
# of LOWER (a nydusfs mount) under a tmpfs upper, as a container runtime would; it must print
# "ready". The container gets its own namespaces (runc spec's defaults).
run_container() {
    local lower=$1 dir=$2 id=$3
    mkdir -p "$dir/rw" "$dir/merged" "$dir/bundle"
    mount -t tmpfs -o size=64m tmpfs "$dir/rw" || fail "tmpfs for the overlay's upper"
    MOUNTS+=("$dir/rw")
    mkdir -p "$dir/rw/upper" "$dir/rw/work"
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$dir/rw/upper,workdir=$dir/rw/work" \
        "$dir/merged" || fail "overlay over $lower"
    MOUNTS+=("$dir/merged")
    runc spec --bundle "$dir/bundle" || fail "runc spec"
    "$PY" - "$dir/bundle/config.json" "$T/image-config.json" "$dir/merged" <<'PYEOF' || fail "runc config"
import json, sys
path, image, root = sys.argv[1:]
c, img = json.load(open(path)), json.load(open(image)).get("config", {})
c["process"].update(terminal=False, args=img.get("Entrypoint", []) + img.get("Cmd", []),
                    cwd=img.get("WorkingDir") or "/")
c["process"]["env"] = img.get("Env", c["process"]["env"])
c["root"] = {"path": root, "readonly": False}
json.dump(c, open(path, "w"), indent=1)
PYEOF
    CONTAINERS+=("$id")
    local out
    out=$(timeout 60 runc --root "$T/runc" run --bundle "$dir/bundle" "$id" < /dev/null) \
        || fail "runc run $id (exit $?)"
    [ "$out" = ready ] || fail "container $id printed '$out', expected 'ready'"
    runc --root "$T/runc" delete --force "$id" > /dev/null 2>&1 || true
    echo "    runc run $id  (rootfs: overlay, lower = $lower, upper = tmpfs)  ->  $out"
    umount "$dir/merged" && umount "$dir/rw" || fail "unmounting the overlay"
}

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

step "nydusfs mount $REG/demo/python:nydus (backend registry, empty disk cache); a container from it"
mkdir -p "$T/rmnt"
printf 'cache: {dir: %s}\n' "$T/cache" > "$T/registry-mount.yaml"
"$NYDUSFS" mount "$REG/demo/python:nydus" "$T/rmnt" --config "$T/registry-mount.yaml" \
    --background | sed 's/^/    /'
mountpoint -q "$T/rmnt" || fail "$T/rmnt is not a mount point"
[ ! -e "$T/rmnt/usr/share/doc" ] || fail "usr/share/doc, deleted by the last layer, is there"
grep -q "edited by the image's last layer" "$T/rmnt/etc/python3.11/sitecustomize.py" \
    || fail "the last layer's change to etc/python3.11/sitecustomize.py is missing"
echo "    whiteouts applied (no usr/share/doc); the last layer's edit and /app/main.py are there"
skopeo inspect --config --tls-verify=false "docker://$REG/demo/python:nydus" > "$T/image-config.json" \
    || fail "skopeo inspect --config"
run_container "$T/rmnt" "$T/ctr-registry" "demo-$$-registry"
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

# ------------------------------------------------------------------------- the local P2P cluster
# Hosts: reg (registry), sn (supernode), p1..p3 (peers). In network namespaces (bench/netlab.py:
# one bridge, every link shaped both ways with tc tbf) each has its own address; without them
# everything runs on loopback ports. `nsenter --net` enters only the network namespace, so the
# FUSE mounts made there are visible here. DEMO_NO_NETNS=1 forces the loopback variant.
step "A local P2P cluster: registry, supernode and three peers (each in its own network namespace where possible)"
stop_pid "$REG_PID"; REG_PID=""   # the registry moves into the cluster (same storage)
PEERS=(p1 p2 p3)
declare -A IP NS PORT PEER_PID
freeport() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
[ -z "${DEMO_NO_NETNS:-}" ] || echo "DEMO_NO_NETNS is set" > "$T/lab.err"
if [ -z "${DEMO_NO_NETNS:-}" ] && "$PY" "$ROOT/bench/netlab.py" up --prefix "$LAB_PREFIX" \
        --hosts reg,sn,p1,p2,p3 --rate 100mbit > "$T/lab.txt" 2>> "$T/lab.err"; then
    LAB_UP=1
    while read -r name netns ip; do
        IP[$name]=$ip NS[$name]="nsenter --net=/run/netns/$netns" PORT[$name]=8002
    done < "$T/lab.txt"
    REG2=${IP[reg]}:5000 SN_ADDR=${IP[sn]}:8001
    echo "    namespaces ${LAB_PREFIX}{br,reg,sn,p1,p2,p3}: one bridge, every link 100 Mbit/s both ways (tc tbf)"
else
    sed 's/^/    /' "$T/lab.err"
    echo "    network namespaces not available: everything on loopback ports instead"
    for h in reg sn p1 p2 p3; do IP[$h]=127.0.0.1 NS[$h]="" PORT[$h]=$(freeport); done
    REG2=127.0.0.1:$(freeport) SN_ADDR=127.0.0.1:$(freeport)
fi
# wait_log FILE TEXT WHAT PID: bounded wait for the line a server logs once it listens.
wait_log() {
    for _ in $(seq 300); do
        grep -q "$2" "$1" 2> /dev/null && return 0
        kill -0 "$4" 2> /dev/null || break
        sleep 0.1
    done
    tail -n 5 "$1" >&2; fail "$3 did not start"
}

mkdir -p "$T/cluster"
printf '%s\n' "version: 0.1" "log: {level: warn, accesslog: {disabled: false}}" \
    "storage: {filesystem: {rootdirectory: $T/registry/data}}" "http: {addr: '$REG2'}" \
    > "$T/cluster/registry.yml"
${NS[reg]} docker-registry serve "$T/cluster/registry.yml" > "$T/cluster/registry.log" 2>&1 &
REG2_PID=$!
PIDS+=("$REG2_PID")
${NS[reg]} "$PY" - "http://$REG2/v2/" <<'PYEOF' || { tail -n 5 "$T/cluster/registry.log" >&2; fail "registry did not start"; }
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
echo "    registry   pid $REG2_PID  http://$REG2  (the same storage: demo/python:nydus is there)"

printf 'listen: %s\n' "$SN_ADDR" > "$T/cluster/supernode.yaml"
${NS[sn]} "$ROOT/.venv/bin/dfagent" supernode --config "$T/cluster/supernode.yaml" \
    > "$T/cluster/supernode.log" 2>&1 &
SN_PID=$!
PIDS+=("$SN_PID")
for p in "${PEERS[@]}"; do
    mkdir -p "$T/cluster/$p"
    cat > "$T/cluster/$p/peer.yaml" <<YAML
id: $p
supernodes: [http://$SN_ADDR]
listen: ${IP[$p]}:${PORT[$p]}
advertise: http://${IP[$p]}:${PORT[$p]}
socket: $T/cluster/$p/agent.sock
data_dir: $T/cluster/$p/data
quota: 1GiB
YAML
    ${NS[$p]} "$ROOT/.venv/bin/dfagent" peer --config "$T/cluster/$p/peer.yaml" \
        > "$T/cluster/$p/peer.log" 2>&1 &
    PEER_PID[$p]=$!
    PIDS+=("${PEER_PID[$p]}")
done
wait_log "$T/cluster/supernode.log" "listening on" "dfagent supernode" "$SN_PID"
echo "    supernode  pid $SN_PID  http://$SN_ADDR"
for p in "${PEERS[@]}"; do
    wait_log "$T/cluster/$p/peer.log" "listening on" "dfagent peer $p" "${PEER_PID[$p]}"
    echo "    peer $p    pid ${PEER_PID[$p]}  http://${IP[$p]}:${PORT[$p]}, local API $T/cluster/$p/agent.sock"
done

step "The image mounted on every peer (backend: dragonfly); a container started on each in turn"
for p in "${PEERS[@]}"; do
    cat > "$T/cluster/$p/mount.yaml" <<YAML
backend:
  type: dragonfly
  registry: {plain_http: true}
  dragonfly: {socket: $T/cluster/$p/agent.sock, fallback: registry}
YAML
    mkdir -p "$T/cluster/$p/mnt"
    NYDUS_MOUNTS+=("$T/cluster/$p/mnt")
    ${NS[$p]} "$NYDUSFS" mount "$REG2/demo/python:nydus" "$T/cluster/$p/mnt" \
        --config "$T/cluster/$p/mount.yaml" --background > "$T/cluster/$p/mount.out" \
        || fail "nydusfs mount on $p"
    pid=$(sed -n 's/.*daemon pid \([0-9]*\).*/\1/p' "$T/cluster/$p/mount.out")
    [ -z "$pid" ] || PIDS+=("$pid")
    echo "    $p: nydusfs mount $REG2/demo/python:nydus  (chunks through $p's agent)"
    run_container "$T/cluster/$p/mnt" "$T/cluster/$p/ctr" "demo-$$-$p"
done

step "Where the bytes came from (each agent's metrics, the registry's access log)"
"$PY" - "$T/cluster" "$T/cluster/registry.log" "$T/nydus-manifest.json" "${PEERS[@]}" <<'PYEOF'
import http.client, json, re, socket, sys
base, reglog, manifest, peers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]


class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("dfagent", timeout=10)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.unix_path)


def metric(text, name, origin):
    m = re.search(rf'^{name}\{{origin="{origin}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


data_blobs = {x["digest"] for x in json.load(open(manifest))["layers"][:-1]}
served = 0
for m in re.finditer(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64})\S* HTTP/[\d.]+" (200|206) (\d+)',
                     open(reglog, errors="replace").read()):
    if m.group(1) in data_blobs:
        served += int(m.group(3))
print(f"    {'peer':6} {'from registry':>14} {'from peers':>12}   chunks from registry / peers")
total = {"source": 0.0, "peer": 0.0}
for p in peers:
    c = Unix(f"{base}/{p}/agent.sock")
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    row = {o: metric(text, "dfagent_peer_bytes_total", o) for o in ("source", "peer")}
    chunks = {o: int(metric(text, "dfagent_peer_chunks_total", o)) for o in ("source", "peer")}
    for o in total:
        total[o] += row[o]
    print(f"    {p:6} {row['source'] / 1e6:11.1f} MB {row['peer'] / 1e6:9.1f} MB   "
          f"{chunks['source']} / {chunks['peer']}")
    if p != peers[0] and row["peer"] == 0:
        sys.exit(f"demo: {p} got nothing from its peers")
needed = total["source"] + total["peer"]
print(f"    the registry served {served / 1e6:.1f} MB of chunk data (its access log) for the "
      f"{needed / 1e6:.1f} MB the three containers needed: {100 * total['peer'] / needed:.0f}% "
      "came from peers")
if served > 1.05 * total["source"] + 1e6:
    sys.exit("demo: the registry served more than the agents fetched from it")
PYEOF

printf '\n%sdemo finished: build, inspect, check, reproducibility, integrity, a lazy mount, convert + mount from a registry, and a P2P cluster all OK%s\n' "$B" "$N"
