#!/usr/bin/env bash
# Create a CA, a SuperLink TLS certificate and one node-authentication key pair per hospital site.
#
#   deploy/make_certs.sh OUT_DIR SERVER_HOSTNAME SITE [SITE ...]
#
# OUT_DIR/ca.crt, ca.key            the consortium's certificate authority (keep ca.key offline)
# OUT_DIR/server.crt, server.key    the SuperLink certificate, valid for localhost, 127.0.0.1 and SERVER_HOSTNAME
# OUT_DIR/sites/<SITE>, <SITE>.pub  each site's ECDSA key pair (private key stays at the site;
#                                   the .pub is registered with `flwr supernode register`)
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 OUT_DIR SERVER_HOSTNAME SITE [SITE ...]" >&2
  exit 2
fi
out=$1; host=$2; shift 2
mkdir -p "$out/sites"
umask 077

openssl req -x509 -newkey rsa:4096 -sha256 -days 3650 -nodes \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=meddiff-fl consortium CA" 2>/dev/null

cat > "$out/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1,DNS:${host}
EXT
openssl req -newkey rsa:4096 -nodes -keyout "$out/server.key" -out "$out/server.csr" -subj "/CN=${host}" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -out "$out/server.crt" -days 825 -sha256 -extfile "$out/server.ext" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"

for site in "$@"; do
  case "$site" in *[!A-Za-z0-9_-]*) echo "site name '$site' may only use letters, digits, _ and -" >&2; exit 2;; esac
  rm -f "$out/sites/$site" "$out/sites/$site.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "meddiff-site-$site" -f "$out/sites/$site"
done
chmod 644 "$out/ca.crt" "$out/server.crt" "$out"/sites/*.pub
echo "wrote CA, server certificate for ${host}, and keys for: $*"
