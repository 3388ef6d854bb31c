#!/usr/bin/env bash
# Regenerate the bundled corpus in opmix_ray/corpus/ (parquet files, SOURCES.yaml and
# tokenizer.json; README.md there is hand-written). Offline: all text comes from local
# files. Needs: apt-get install bible-kjv dict-gcide manpages manpages-dev groff-base \
#   fortunes fortunes-min
# The python domain is the running interpreter's stdlib (the bundled copy used 3.11.7)
# and licenses depends on which packages are installed, so other machines differ there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" -m opmix_ray.data.build --out opmix_ray/corpus \
  --sizes python=1.6,bible=1.2,dictionary=1.0,manpages=0.7,fortunes=0.35,licenses=0.25 \
  --vocab-size 4096 --seed 0
