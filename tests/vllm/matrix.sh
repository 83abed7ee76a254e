#!/usr/bin/env bash
# make test-vllm: KvxConnector's whole matrix, one entry at a time (each
# takes the machine's cores): the connector's own tests; prefill and decode
# engines on two hosts over UCX (timed) and libfabric; a TP-2 prefill engine
# beside a TP-1 decode engine; vLLM's NixlConnector through the same checks
# and stopwatch (with nixl-cu12 from make bench-peers' environment); and kvx
# reading the caches vLLM 0.33's own allocator makes, in each of its layouts.
set -u
cd "$(dirname "$0")/../.."
. tests/lib/runner.sh
runner_init build/test-logs/vllm-matrix 1
py=build/vllm/bin/python

section "KvxConnector's side channel and parameter checks"
entry "vllm: side channel and kv_transfer_params against hostile clients and routers" 120 \
  $py -m pytest -q -p no:warnings -p no:cacheprovider tests/vllm/test_connector.py
section "two engines on two hosts, against one engine alone"
entry "vllm: ucx tcp, with 8 requests timed" 600 bash tests/vllm/two_hosts.sh --backend ucx --bench 8
entry "vllm: libfabric tcp" 600 bash tests/vllm/two_hosts.sh --backend ofi
# Three engines' workers on two cores: vLLM binds each worker to a core and
# its threads wait by spinning, so reads get a longer deadline here.
entry "vllm: prefill TP 2, decode TP 1 (ucx tcp)" 900 bash tests/vllm/two_hosts.sh --backend ucx --prefill-tp 2 --read-timeout-ms 15000
section "vLLM's NixlConnector through the same checks and stopwatch (what it does, not a test of it)"
if make -s build/peers/ready >/dev/null 2>&1; then
  entry "vllm: NixlConnector (nixl-cu12, ucx tcp), 8 requests timed" 900 bash tests/vllm/two_hosts.sh --connector nixl --bench 8
else
  entry "vllm: NixlConnector: nixl-cu12 could not be installed (make build/peers/ready)" 10 false
fi
section "kvx reads the caches vLLM 0.33's allocator makes (vllm==0.33.0 --no-deps beside the CPU torch)"
entry "vllm 0.33: install" 1200 bash tests/vllm033/install.sh
entry "vllm 0.33: every layout of its allocator, read between processes, TP 1->1, 1->2, 2->1, 2->4, a replicated head" 600 \
  env UCX_TLS=tcp UCX_NET_DEVICES=lo build/vllm033/bin/python -m pytest -q -p no:warnings -p no:cacheprovider tests/vllm033
runner_end
rc=$?
echo
echo "== the stopwatch, and what NixlConnector does where kvx's checks pass"
grep -h "^bench \|^NixlConnector does" build/test-logs/vllm-matrix/*.log
exit $rc
