#!/usr/bin/env bash
# Make a private CA and a server certificate for the SuperLink (`fedtune server --certs DIR`).
#
#   deploy/make-certs.sh DIR [NAME_OR_IP ...]
#
# The server certificate is valid for localhost, 127.0.0.1 and every NAME_OR_IP given: list each
# address clients dial (`fedtune client --server NAME_OR_IP:PORT`). Clients need only DIR/ca.crt
# (`--root-certificates`). Existing files are never overwritten: delete DIR to start again.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 DIR [NAME_OR_IP ...]" >&2
  exit 2
fi
dir=$1
shift
if [ -e "$dir/ca.crt" ] || [ -e "$dir/server.crt" ]; then
  echo "error: $dir already holds certificates; delete it to make new ones" >&2
  exit 1
fi
mkdir -p "$dir"
chmod 700 "$dir"

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
    sans="$sans,IP:$name"
  else
    sans="$sans,DNS:$name"
  fi
done

openssl req -x509 -newkey rsa:4096 -sha256 -days 3650 -nodes -subj "/CN=fedtune CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=fedtune server" \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
openssl x509 -req -sha256 -days 825 -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
  -CAcreateserial -out "$dir/server.crt" \
  -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$sans") 2>/dev/null
rm -f "$dir/server.csr" "$dir/ca.srl"
chmod 600 "$dir/ca.key" "$dir/server.key"
echo "made $dir/ca.crt (give it to every client) and $dir/server.crt, $dir/server.key for: $sans"
