#!/usr/bin/env bash
# Fill .whl (git-ignored) with what benchmarks/gpu/run.sh installs on the GPU machine, which has no
# network and lacks these packages: CPython 3.12 manylinux x86_64 wheels, no dependencies pulled (the
# image has torch 2.11, triton 3.6, transformers 5.17, numpy, tokenizers, httpx, click, jinja2,
# prometheus-client, uvloop), plus the bundled SmolLM2 tokenizer as Hugging Face files (for serving
# the dummy 8B model). Run from the repository root after `make setup` (it reads the GGUF from .venv):
#   bash benchmarks/gpu/make_wheels.sh        # ~12.5 MB; the device tool carries at most 64 MiB a call
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
# pydantic 2.12.5 / pydantic-core 2.41.5: 2.14 needs a newer typing-extensions than the image has, so
# typing_extensions 4.16 travels too (typing-inspection 0.4.5 needs >= 4.15); fastapi 0.165 needs
# starlette >= 1.6, annotated-doc and opentelemetry-api >= 1.44; xgrammar 0.2.8 needs apache-tvm-ffi.
.venv/bin/python -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 msgspec==0.23.0 gguf==0.19.0 pyzmq==27.3.0 \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.12.5 pydantic-core==2.41.5 uvicorn==0.55.0 h11==0.16.0 \
  typing-inspection==0.4.5 annotated-types==0.8.0 annotated-doc==0.0.7 opentelemetry-api==1.45.3 \
  typing-extensions==4.16.0 anyio==4.16.0
.venv/bin/python - <<'PY'
from kestrel.frontend.gguf_tokenizer import tokenizer_from_gguf
from kestrel.model_files import default_model_path

tokenizer_from_gguf(default_model_path()).save_pretrained(".whl/smol-tokenizer")
PY
du -sh .whl
