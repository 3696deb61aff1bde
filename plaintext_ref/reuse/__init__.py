"""Cache reuse across requests, structured attention, KV scheduling and diffusion-LM KV refresh (issue 18).

Spec: /work/shared/research/kv_methods.md §9 (CacheBlend, KVShare, Graph-KV), §10 (Continuum), §11 (Elastic-Cache).
These sit *above* the per-layer ``plaintext_ref.policies`` (kv_methods.md §15, goal 5): they build or schedule whole
request caches. ``runner`` drives a HF Llama layer by layer with explicit positions, token subsets and block masks;
``store`` is the content-addressed cache store the reuse methods share.
"""
from plaintext_ref.reuse.cacheblend import BlendResult, CacheBlend, selective_prefill
from plaintext_ref.reuse.continuum import ToolTTL
from plaintext_ref.reuse.continuum_sim import POLICIES as CONTINUUM_POLICIES
from plaintext_ref.reuse.continuum_sim import SimConfig, SimResult, make_workload, simulate
from plaintext_ref.reuse.elastic_cache import ElasticCache
from plaintext_ref.reuse.graphkv import GraphKV, block_mask, rag_graph
from plaintext_ref.reuse.kvshare import KVShare, Request, align, simulate_schedule
from plaintext_ref.reuse.runner import LayerRunner, SeqKV
from plaintext_ref.reuse.store import KVStore, content_key, model_fingerprint

__all__ = ["BlendResult", "CONTINUUM_POLICIES", "CacheBlend", "ElasticCache", "GraphKV", "KVShare", "KVStore",
           "LayerRunner", "Request", "SeqKV", "SimConfig", "SimResult", "ToolTTL", "align", "block_mask",
           "content_key", "make_workload", "model_fingerprint", "rag_graph", "selective_prefill", "simulate",
           "simulate_schedule"]
