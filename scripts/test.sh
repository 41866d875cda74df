#!/usr/bin/env bash
# The project's test command: install what is missing (fast when all is there), then run pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k smoke).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh || exit 1
python3 -m pytest -q -x "$@"
code=$?
if [[ $code -eq 5 ]]; then
  # pytest's "no tests collected": not a failure of the code, but say so loudly.
  echo "test.sh: pytest collected no tests" >&2
  exit 0
fi
exit $code
