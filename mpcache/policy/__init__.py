"""MPC KV policies on the secret-shared cache (one per file; registry in ``base``).

``get_policy(name, meter, **options)`` builds one; a ``Sequence`` (``SecureTransformer.new_sequence``)
runs one generation under it. Plaintext twins live in ``plaintext_ref.policies``.
"""
from mpcache.policy.base import MPCPolicy, StaticEviction, get_policy, policy_names, register
from mpcache.policy.full import FullCache
from mpcache.policy.h2o import H2O
from mpcache.policy.mpcache import MPCache
from mpcache.policy.quest import Quest
from mpcache.policy.snapkv import SnapKV
from mpcache.policy.streaming_llm import StreamingLLM

__all__ = ["MPCPolicy", "StaticEviction", "FullCache", "H2O", "MPCache", "Quest", "SnapKV", "StreamingLLM",
           "get_policy", "policy_names", "register"]
