"""flashsdpa: flash attention for PyTorch, exact to torch's scaled_dot_product_attention."""

from flashsdpa.api import attention, scaled_dot_product_attention
from flashsdpa.cache import kernel_cache
from flashsdpa.descriptor import AttentionDescriptor, KernelKey, MaskKind
from flashsdpa.dispatch import UnsupportedError, reset_stats, stats, use_backend
from flashsdpa.integrations.sdpa import disable, enable, sdpa
from flashsdpa.kvcache import kvcache_attention
from flashsdpa.merge import merge_attention
from flashsdpa.varlen import varlen_attn

__version__ = "0.1.0"


def cache_info():
    """The compiled kernel variants held, with hits and misses (thread-safe)."""
    return kernel_cache.info()


__all__ = [
    "AttentionDescriptor",
    "KernelKey",
    "MaskKind",
    "UnsupportedError",
    "attention",
    "cache_info",
    "disable",
    "enable",
    "kvcache_attention",
    "merge_attention",
    "reset_stats",
    "scaled_dot_product_attention",
    "sdpa",
    "stats",
    "use_backend",
    "varlen_attn",
]
