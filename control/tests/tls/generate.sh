#!/usr/bin/env bash
# Test-only certificates for control/tests/tls.rs: a CA, one certificate for every replica and
# gateway (server and client authentication, DNS name flyball-control, IP 127.0.0.1), a client
# certificate from another CA that the control service must refuse, and the CA and certificate
# a rotation moves to (next-ca.crt, next.crt, next.key). Valid for 100 years; the CA keys are
# thrown away. Run from this directory to regenerate.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
days=36500

ca() { # name
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/$1.key"
  openssl req -x509 -new -key "$work/$1.key" -days $days -subj "/CN=$1" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$work/$1.crt"
}

leaf() { # name ca
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=flyball-control" -out "$work/$1.csr"
  printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=DNS:flyball-control,IP:127.0.0.1" >"$work/$1.ext"
  openssl x509 -req -in "$work/$1.csr" -CA "$work/$2.crt" -CAkey "$work/$2.key" \
    -CAcreateserial -days $days -extfile "$work/$1.ext" -out "$1.crt"
}

ca ca
ca rogue-ca
leaf replica ca
leaf rogue rogue-ca
ca next-ca
leaf next next-ca
cp "$work/ca.crt" ca.crt
cp "$work/next-ca.crt" next-ca.crt
