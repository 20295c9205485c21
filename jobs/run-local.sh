#!/bin/bash
# Run one fedmpi experiment on a workstation under mpiexec, one torch thread per rank.
#   jobs/run-local.sh [-n RANKS] CONFIG.yaml [fedmpi run arguments: --set k=v, --out F.h5, --resume]
# RANKS defaults to 2 (a server and one client rank). mpiexec is $MPIEXEC if set, else the
# project virtualenv's (.venv/bin/mpiexec), else the one on PATH; Python likewise ($PYTHON).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ranks=2
if [ "${1:-}" = "-n" ]; then
    ranks=${2:?"-n needs a number of ranks"}
    shift 2
fi
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    echo "usage: $0 [-n RANKS] CONFIG.yaml [--set key=value ...] [--out FILE.h5] [--resume]" >&2
    exit 2
fi

venv_or_path() {  # the virtualenv's program if it exists, else the one on PATH
    if [ -x "$repo/.venv/bin/$1" ]; then echo "$repo/.venv/bin/$1"; else echo "$1"; fi
}
mpiexec=${MPIEXEC:-$(venv_or_path mpiexec)}
python=${PYTHON:-$(venv_or_path python)}

# The ranks import this checkout's fedmpi, wherever the command is run from.
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
# One OpenMP/BLAS thread per rank: the ranks already fill the cores.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# exec: a SIGTERM to this script reaches mpiexec, which passes it on to the ranks (exit 75).
exec "$mpiexec" -n "$ranks" "$python" -m fedmpi run "$@"
