#!/usr/bin/env bash
# The system tools the test suite runs for real: nix-instantiate (flake.nix parses), Chromium and
# a font (the browser tests), the PostgreSQL server (services mode), promtool (the alert rules).
# Installs what is missing from Debian's apt when it can (root, or sudo without a password);
# otherwise stops at once and prints the command to run. Used by `make test` and `.ci/run`.
set -euo pipefail

need=()
command -v nix-instantiate >/dev/null 2>&1 || need+=(nix-bin)
[ -x "${DAGMA_CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium chromium-driver)
find /usr/share/fonts -name '*.ttf' -print -quit 2>/dev/null | grep -q . || need+=(fonts-dejavu-core)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0

install="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${need[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "The test suite needs: ${need[*]} (Debian package names). This machine has no apt-get:" >&2
  echo "install them with its package manager, or use the devcontainer or \`nix develop\`." >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo="sudo"
else
  echo "The test suite needs system packages that are missing: ${need[*]}." >&2
  echo "Install them, then run make test again:" >&2
  echo "  sudo sh -c '$install'" >&2
  exit 1
fi
echo "Installing the test suite's system packages: ${need[*]}"
$sudo sh -c "$install" >/dev/null
