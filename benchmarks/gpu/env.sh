# Sourced by the other scripts here, on a GPU machine with no network: zili runs from this tree,
# the Python packages that machine lacks come as wheels in .whl/ (see README.md in this folder).
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -e /root/site/.zili-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl \
        && touch /root/site/.zili-wheels
fi
export PYTHONPATH=/root/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export ZILI_TUNE_CACHE=${ZILI_TUNE_CACHE:-/root/zili-tune.json}
OUT=${OUT:-/tmp/zili-gpu-out}
mkdir -p "$OUT"
zili() { python3 -m zili "$@"; }
