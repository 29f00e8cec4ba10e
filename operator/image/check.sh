#!/usr/bin/env bash
# Checks the operator image that operator/image/build.sh makes: two builds of the same
# tree give the same digest; the unpacked image holds exactly the binary, the libraries it
# links, CA certificates, passwd/group and /tmp (no shell); it runs as user 65532 and
# answers `version`. Ends with a line "image: N passed, N failed".
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${SCHEMAGATE_IMAGE_DIR:-$root/target/image}
passed=0; failed=0
ok() { echo "ok: $1"; passed=$((passed + 1)); }
not_ok() { echo "FAILED: $1" >&2; failed=$((failed + 1)); }

"$root/operator/image/build.sh" || { echo "image: 0 passed, 1 failed"; exit 1; }
first=$(cat "$out/digest")
"$root/operator/image/build.sh" >/dev/null || { echo "image: 0 passed, 1 failed"; exit 1; }
second=$(cat "$out/digest")
if [ "$first" = "$second" ]; then ok "two builds give the same digest $first"; else not_ok "digests differ: $first vs $second"; fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
bundle=$out/bundle
rm -rf "$bundle"
if umoci unpack --rootless --image "$out/oci:$version" "$bundle" >/dev/null 2>&1 || umoci unpack --image "$out/oci:$version" "$bundle" >/dev/null; then
  ok "umoci unpacks the OCI layout"
else
  not_ok "umoci unpack failed"
fi
rootfs=$bundle/rootfs
unexpected=$(cd "$rootfs" && find . -type f -o -type l | sed 's|^\./||' | grep -v -E '^(usr/local/bin/schemagate|etc/ssl/certs/ca-certificates\.crt|etc/passwd|etc/group|(usr/)?lib(64|/x86_64-linux-gnu)?/(ld-linux|lib[a-z_]+)[^/]*\.so[.0-9]*)$' || true)
if [ -z "$unexpected" ]; then ok "the image holds only the binary, its libraries, CA certificates, passwd and group"; else not_ok "unexpected files: $unexpected"; fi
if [ ! -e "$rootfs/bin/sh" ] && [ ! -e "$rootfs/usr/bin/sh" ]; then ok "no shell"; else not_ok "a shell is in the image"; fi
answer=$(chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/schemagate version 2>&1)
if [ "$answer" = "schemagate $version" ]; then ok "the binary answers '$answer' as user 65532 in the image's root"; else not_ok "version answered: $answer"; fi
config=$(python3 - "$bundle/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(c["process"]["user"]["uid"], c["process"]["user"]["gid"], " ".join(c["process"]["args"]))
PY
)
if [ "$config" = "65532 65532 /usr/local/bin/schemagate run" ]; then ok "non-root user and entrypoint"; else not_ok "runtime config: $config"; fi
labels=$(python3 - "$out/oci" <<'PY'
import json, sys, os
root = sys.argv[1]
index = json.load(open(os.path.join(root, "index.json")))
def blob(d): return json.load(open(os.path.join(root, "blobs", *d.split(":"))))
manifest = blob(index["manifests"][0]["digest"])
config = blob(manifest["config"]["digest"])
labels = config["config"].get("Labels", {})
print(labels.get("org.opencontainers.image.version"), labels.get("org.opencontainers.image.revision", "")[:7], labels.get("org.opencontainers.image.source"))
PY
)
case "$labels" in
  "$version "*" https://"*) ok "OCI labels: $labels" ;;
  *) not_ok "OCI labels: $labels" ;;
esac
echo "image size: $(du -sh "$rootfs" | cut -f1) unpacked, $(du -h "$out/schemagate.tar" | cut -f1) archive"
echo "image: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
