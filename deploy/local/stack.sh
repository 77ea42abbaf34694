#!/usr/bin/env bash
# The local stack is deploy/local/stack.py (`stack.sh help` lists its commands); this wrapper
# keeps the name that the Makefile, .ci/run, the tests and people's habits call. It runs
# stack.py with the project's virtualenv, or with python3 before `make install` (store-build
# and kafka-fetch need nothing else; the other commands say to run `make install`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
py=$root/.venv/bin/python
[[ -x $py ]] || py=$(command -v python3.11 || command -v python3)
exec "$py" "$root/deploy/local/stack.py" "$@"
