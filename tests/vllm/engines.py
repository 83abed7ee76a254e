"""Helpers to start a vLLM 0.32 (CPU build) engine on the tiny test model and
run token-id prompts through it.

Every script that creates an engine must guard its entry point with
``if __name__ == "__main__":`` (vLLM starts its engine core in a spawned
process that re-imports __main__).

    from engines import make_engine, run_prompts, run_reference, kv_config
    llm = make_engine(model_dir, kv_transfer_config=kv_config("kv_producer"))
    results = run_prompts(llm, [[5, 6, 7]], max_tokens=8)

The environment this needs is set by setup_env(), which make_engine() calls:
HF_HUB_OFFLINE=1 (nothing is fetched), VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV
cache; the default takes a large share of RAM), and PYTHONPATH extended with
this directory so the engine-core process can import recording_connector.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_DIR = "/tmp/kvx-tiny-llama"
BLOCK_SIZE = 32  # the CPU attention backend requires a multiple of 32


def setup_env(kv_cache_gib: int = 1) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    pp = os.environ.get("PYTHONPATH", "")
    if HERE not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = HERE + (os.pathsep + pp if pp else "")
    if HERE not in sys.path:
        sys.path.insert(0, HERE)


def ensure_model(model_dir: str = DEFAULT_MODEL_DIR) -> str:
    """Create the tiny model in model_dir if it is not there yet."""
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        setup_env()
        from make_model import write_model

        write_model(model_dir)
    return model_dir


def kv_config(kv_role: str,
              connector: str = "RecordingConnector",
              module_path: str | None = "recording_connector",
              engine_id: str | None = None,
              **extra: Any):
    """KVTransferConfig for one side of P/D.

    kv_role: "kv_producer" (prefill), "kv_consumer" (decode) or "kv_both".
    extra: other KVTransferConfig fields, e.g.
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={...}.
    """
    from vllm.config import KVTransferConfig

    kw = dict(kv_connector=connector, kv_role=kv_role, kv_buffer_device="cpu")
    if module_path:
        kw["kv_connector_module_path"] = module_path
    if engine_id:
        kw["engine_id"] = engine_id
    kw.update(extra)
    return KVTransferConfig(**kw)


def make_engine(model_dir: str = DEFAULT_MODEL_DIR,
                kv_transfer_config=None,
                *,
                seed: int = 0,
                max_model_len: int = 1024,
                max_num_seqs: int = 16,
                max_num_batched_tokens: int | None = None,
                enable_prefix_caching: bool = True,
                tensor_parallel_size: int = 1,
                log_stats: bool = True,
                **kwargs: Any):
    """Start vllm.LLM on the tiny model: float32, block_size 32, eager,
    no tokenizer, hybrid KV cache manager off (a connector without
    SupportsHMA requires that)."""
    setup_env()
    ensure_model(model_dir)
    from vllm import LLM

    args = dict(
        model=model_dir,
        skip_tokenizer_init=True,
        dtype="float32",  # bfloat16 dies by SIGILL on this CPU for big batches
        block_size=BLOCK_SIZE,
        enforce_eager=True,
        seed=seed,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=enable_prefix_caching,
        disable_hybrid_kv_cache_manager=True,
        tensor_parallel_size=tensor_parallel_size,
        # Stats on, so llm.get_metrics() has the prompt-token breakdown.
        disable_log_stats=not log_stats,
    )
    if max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = max_num_batched_tokens
    if kv_transfer_config is not None:
        args["kv_transfer_config"] = kv_transfer_config
    args.update(kwargs)
    return LLM(**args)


@dataclass
class Result:
    request_id: str
    prompt_len: int
    tokens: list[int]
    # one {token_id: logprob} dict per generated token (top-k plus the chosen)
    logprobs: list[dict[int, float]]
    kv_transfer_params: dict | None = None
    num_cached_tokens: int | None = None
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)

    def chosen_logprobs(self) -> list[float]:
        return [lp.get(t, float("nan")) for t, lp in zip(self.tokens, self.logprobs)]


def sampling_params(max_tokens: int, logprobs: int = 5,
                    kv_transfer_params: dict | None = None):
    from vllm import SamplingParams

    extra = None
    if kv_transfer_params is not None:
        # This is how vLLM 0.32 carries kv_transfer_params for offline use:
        # Request.__init__ reads sampling_params.extra_args["kv_transfer_params"]
        # (the OpenAI server copies the request body's field there too).
        extra = {"kv_transfer_params": dict(kv_transfer_params)}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens,
                          logprobs=logprobs, ignore_eos=True, detokenize=False,
                          extra_args=extra)


def run_prompts(llm, prompts: list[list[int]], max_tokens: int | list[int] = 16,
                logprobs: int = 5,
                kv_transfer_params: list[dict | None] | None = None) -> list[Result]:
    """Run token-id prompts as one batch (all in flight at once)."""
    n = len(prompts)
    mts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * n
    ktps = kv_transfer_params or [None] * n
    sps = [sampling_params(m, logprobs, k) for m, k in zip(mts, ktps)]
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sps,
                        use_tqdm=False)
    res = []
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        lps = []
        for d in (c.logprobs or []):
            lps.append({int(t): float(lp.logprob) for t, lp in d.items()})
        res.append(Result(request_id=o.request_id, prompt_len=len(p),
                          tokens=list(c.token_ids), logprobs=lps,
                          kv_transfer_params=o.kv_transfer_params,
                          num_cached_tokens=o.num_cached_tokens,
                          finish_reason=c.finish_reason))
    return res


def run_reference(prompts: list[list[int]], max_tokens: int | list[int] = 16,
                  model_dir: str = DEFAULT_MODEL_DIR, logprobs: int = 5,
                  **engine_kw) -> list[Result]:
    """One engine, no connector: the tokens P/D must reproduce."""
    llm = make_engine(model_dir, None, **engine_kw)
    try:
        return run_prompts(llm, prompts, max_tokens, logprobs)
    finally:
        shutdown(llm)


PROMPT_METRICS = (
    "vllm:prompt_tokens_by_source",   # source=local_compute|local_cache_hit|external_kv_transfer
    "vllm:prompt_tokens_cached",
    "vllm:prompt_tokens",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:external_prefix_cache_queries",
    "vllm:external_prefix_cache_hits",
)


def prompt_metrics(llm) -> dict[str, float]:
    """Cumulative prompt-token counters of this engine (needs log_stats).

    Note the caveat for P/D: vllm:prompt_tokens_by_source{source=
    "local_compute"} counts prompt - cached *at admission*, so a decode
    engine that loaded the whole prompt reports 0 there although vLLM
    recomputes the last prompt token to sample the first output token.
    """
    out: dict[str, float] = {}
    try:
        ms = llm.get_metrics()
    except Exception as e:  # stats disabled
        return {"error": repr(e)}
    for m in ms:
        if m.name not in PROMPT_METRICS:
            continue
        labels = {k: v for k, v in m.labels.items()
                  if k not in ("model_name", "engine")}
        key = m.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
                        if labels else "")
        val = getattr(m, "value", None)
        if val is not None:
            out[key] = out.get(key, 0) + val
    return out


def metrics_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after
            if isinstance(after[k], (int, float)) and after[k] != before.get(k, 0)}


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


def peak_rss_mib() -> dict:
    """Peak RSS of this process and of its (waited-for or live) children."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    live = {}
    try:
        import psutil

        for c in psutil.Process().children(recursive=True):
            try:
                live[c.pid] = round(c.memory_info().rss / 2**20, 1)
            except Exception:
                pass
    except ImportError:
        pass
    return {"self_peak": round(me, 1), "waited_children_peak": round(kids, 1),
            "live_children_rss": live}


def test_prompts(vocab: int = 1024, seed: int = 7) -> dict[str, list[int]]:
    """Deterministic token-id prompts: 1 token, 40 tokens (one full block and
    8 in the next), 100 tokens (3 full blocks, 4 in the last), 64 (exactly 2
    blocks) and 31/33 around a block edge."""
    import random

    rnd = random.Random(seed)

    def p(n):
        return [rnd.randrange(3, vocab) for _ in range(n)]

    return {"len1": p(1), "len40": p(40), "len100": p(100), "len64": p(64),
            "len31": p(31), "len33": p(33)}


class Timer:
    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *a):
        self.s = time.monotonic() - self.t0
