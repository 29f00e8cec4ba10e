#!/usr/bin/env bash
# Builds the operator image offline into target/image/: an OCI layout (target/image/oci,
# tag = the crate version) and an OCI archive (target/image/schemagate.tar). Reproducible:
# the same commit gives the same digest (file times and the creation time are fixed to 0,
# the labels carry the version and the commit). Prints the digest and the size.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${SCHEMAGATE_IMAGE_DIR:-$root/target/image}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then revision="$revision-dirty"; fi

cargo build -q --release -p schemagate --bin schemagate
binary=${CARGO_TARGET_DIR:-$root/target}/release/schemagate

context=$out/context
rm -rf "$context"
mkdir -p "$context/usr/local/bin" "$context/etc/ssl/certs" "$context/tmp"
install -m 0755 "$binary" "$context/usr/local/bin/schemagate"
# The shared libraries the binary links, at the paths the loader looks for them.
for lib in $(ldd "$binary" | awk '/=> \//{print $3} /^\s*\/[^ ]*ld-linux/{print $1}'); do
  mkdir -p "$context$(dirname "$lib")"
  cp -L "$lib" "$context$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$context/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' > "$context/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$context/etc/group"
chmod 1777 "$context/tmp"

storage=(--storage-driver vfs --root "$out/storage" --runroot "$out/run")
tag="schemagate:$version"
buildah "${storage[@]}" bud --quiet --timestamp 0 --layers=false \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
  -f operator/image/Containerfile -t "$tag" "$context" >/dev/null
rm -rf "$out/oci" "$out/schemagate.tar"
buildah "${storage[@]}" push --quiet "$tag" "oci:$out/oci:$version"
buildah "${storage[@]}" push --quiet "$tag" "oci-archive:$out/schemagate.tar:$version"
digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$out/oci/index.json")
echo "$digest" > "$out/digest"
echo "image: schemagate:$version $digest ($(du -h "$out/schemagate.tar" | cut -f1) archive) in $out"
