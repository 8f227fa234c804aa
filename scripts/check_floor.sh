#!/usr/bin/env bash
# The floor of every range in pyproject.toml, proved: a fresh virtual environment gets the lowest
# torch and the torchvision built for it from the package index first (as a researcher's own
# environment would hold them), then `pip install -e` must keep them (checked with --dry-run
# before installing), with every other dependency at the lower bound pyproject.toml declares.
# Then a short glyphs training and the `not slow` tests run there, on one core.
#
# A one-off, not CI: it downloads several GB (torch's CUDA wheels) and the suite takes about half
# an hour on one core. Record its result in docs/development.md#supported-versions.
#
#   bash scripts/check_floor.sh                 # venv in /tmp/fewshot-floor, python3
#   PYTHON=python3.10 VENV=/tmp/floor310 bash scripts/check_floor.sh
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${VENV:-/tmp/fewshot-floor}
log=${LOG:-$venv.log}
export OMP_NUM_THREADS=1  # one core: the suite runs in one process (no xdist)

"$python" -m venv --clear "$venv"
pip=("$venv/bin/python" -m pip)

# Every dependency's lower bound as an exact requirement, read from pyproject.toml: ">=2.6,<3"
# becomes "==2.6" (2.6.0), the environment markers kept.
floors=$(mktemp)
"$venv/bin/python" - "$floors" <<'EOF'
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the TOML reader pip carries
    from pip._vendor import tomli as tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
lines = []
for req in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
    spec, _, marker = req.partition(";")
    name, low = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9.]+)\s*(,.*)?", spec).group(1, 2)
    lines.append(f"{name}=={low}" + (f"; {marker.strip()}" if marker else ""))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF
echo "floors:"; cat "$floors"
floor_of() { grep -E "^$1==" "$floors" | cut -d= -f3; }

# 1. The floor pair, alone, from the index: a researcher's own torch.
"${pip[@]}" install "torch==$(floor_of torch)" "torchvision==$(floor_of torchvision)"

# 2. Installing fewshot next to it must not touch torch or torchvision.
plan=$("${pip[@]}" install --dry-run -e . 2>&1)
echo "$plan" | grep -E "^Would install" || true
if echo "$plan" | grep -E "^Would install" | grep -qwE "torch-[0-9.]+|torchvision-[0-9.]+"; then
  echo "FAIL: pip install -e . would replace the installed torch or torchvision" >&2
  exit 1
fi

# 3. fewshot with every other dependency at its floor.
"${pip[@]}" install -c "$floors" -e '.[dev,cluster]'
"${pip[@]}" freeze --exclude-editable > "$venv/freeze.txt"
grep -iE "^(torch|torchvision|kornia|hydra-core|omegaconf|numpy)==" "$venv/freeze.txt"

# 4. The README's training, short, and the everyday tests.
work=$(mktemp -d)
(cd "$work" && "$venv/bin/fewshot" train dataset=glyphs train.steps=50 train.val_every=50)
set +e
"$venv/bin/python" -m pytest -m "not slow" -p no:xdist -o addopts="-ra --durations=15" -q \
  2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "floor suite: exit $status (log: $log)"
exit "$status"
