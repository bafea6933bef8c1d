#!/usr/bin/env sh
# initializeCommand, on the host before compose starts: compose.yaml refuses to start without
# its secrets, so .env (mode 600) gets a fresh random value for each one missing or a placeholder.
# A value already in the environment (a Codespaces secret) is used instead; real values in .env
# are kept. The list and the rules are src/dagma/env_secrets.py's, which needs only Python 3.8+
# (no venv yet on the host), so the names are not repeated here.
set -eu
cd "$(dirname "$0")/.."
for python in python3 python; do
  if "$python" -c 'import sys; sys.exit(sys.version_info < (3, 8))' >/dev/null 2>&1; then
    PYTHONPATH=src exec "$python" -B -m dagma.env_secrets init .env
  fi
done
echo "init-env.sh needs Python 3.8+ (python3) on the host to write .env's secrets." >&2
echo "Install it, or write .env elsewhere with \`dagma secrets init\` and copy it here." >&2
exit 2
