#!/usr/bin/env bash
# vLLM 0.33 into build/vllm033, for tests/vllm033: only what its KV cache
# allocator (vllm.v1.worker.utils.allocate_kv_cache) and config objects need.
# There is no vLLM 0.33 CPU build, so vllm==0.33.0 goes in with --no-deps
# beside the CPU torch this machine's pip serves, and then the pure-Python
# packages its imports reach, pinned to a set known to work (--no-deps too:
# their full requirements would pull CUDA wheels). vllm._C is absent; the
# allocator does not need it ("Failed to import from vllm._C" is harmless).
# Then kvx's package (pip builds libkvx.so from the headers).
#
# Idempotent: with build/vllm033/ready present it exits at once, unless kvx's
# package or headers changed since, when it reinstalls kvx alone.
set -eu
cd "$(dirname "$0")/../.."
V=build/vllm033
PIP="timeout 600 $V/bin/pip install -q --disable-pip-version-check"

kvx_changed() {
  [ -n "$(find python kvx*.h -newer "$V/ready" -type f -not -path '*/__pycache__/*' -print -quit 2>/dev/null)" ]
}

install_kvx() {
  # --force-reinstall: the version does not change when the sources do
  $PIP --no-deps --force-reinstall ./python
}

if [ -f "$V/ready" ]; then
  if kvx_changed; then
    install_kvx
    touch "$V/ready"
  fi
  exit 0
fi

[ -x "$V/bin/pip" ] || timeout 120 python3 -m venv "$V"

# torch and what it and pytest need, resolved by pip at these versions
$PIP torch==2.13.0 numpy==2.4.6 pytest==9.2.0 \
  filelock==4.3.2 fsspec==2026.9.0 Jinja2==3.1.6 MarkupSafe==3.0.4 networkx==3.6.1 \
  sympy==1.14.0 mpmath==1.3.0 typing_extensions==4.16.0 \
  iniconfig==2.3.1 packaging==26.4 pluggy==1.7.0 Pygments==2.21.0

$PIP --no-deps vllm==0.33.0

# what `from vllm.v1.worker.utils import allocate_kv_cache` and vLLM's config
# objects import, and theirs
$PIP --no-deps \
  aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 annotated-doc==0.0.7 annotated-types==0.8.0 \
  anyio==4.16.0 apache-tvm-ffi==0.1.11 attrs==26.1.0 cachetools==8.0.2 cbor2==6.3.0 \
  certifi==2026.10.19.post1 cloudpickle==3.1.3 einops==0.8.2 fastapi==0.136.3 frozenlist==1.8.0 \
  h11==0.16.0 httpcore2==2.17.0 httpx2==2.17.0 huggingface_hub==2.4.0 idna==3.21 \
  llguidance==1.7.6 msgspec==0.23.0 multidict==7.2.1 openai==3.63.0 oss-harmony==0.0.11 \
  partial-json-parser==0.2.1.1.post7 pillow==13.0.0 prometheus_client==0.26.0 propcache==0.5.4 \
  psutil==7.2.2 py-cpuinfo==9.0.0 pybase64==1.5.1 pydantic==2.14.4 pydantic_core==2.50.5 \
  PyYAML==6.0.4 pyzmq==27.3.0 regex==2026.12.2 requests==2.34.2 safetensors==0.8.0 \
  sniffio==1.3.1 starlette==1.10.0 tokenizers==0.23.3 tqdm==4.70.1 transformers==5.20.2 \
  truststore==0.10.5 typing-inspection==0.4.5 urllib3==2.8.0 uvloop==0.23.0 xgrammar==0.2.8 \
  yarl==1.25.1

install_kvx

# their PyPI builds break beside this torch ("operator torchvision::nms does not exist")
for p in torchvision torchaudio torchcodec; do
  if "$V/bin/pip" show -q "$p" >/dev/null 2>&1; then timeout 120 "$V/bin/pip" uninstall -q -y "$p"; fi
done

# no GPU here: without VLLM_TARGET_DEVICE vLLM finds no platform
VLLM_TARGET_DEVICE=cpu timeout 300 "$V/bin/python" -c 'from vllm.v1.worker.utils import allocate_kv_cache' >/dev/null
touch "$V/ready"
