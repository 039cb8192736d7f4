"""RaSA rank sharing: moved to `rslora_jax.methods.rasa` (the `RaSA` method); re-exported here.

``LoraConfig(rasa=True, rasa_k=...)`` is the same as ``LoraConfig(method=RaSA(k=...))``.
"""

from __future__ import annotations

from rslora_jax._types import PyTree
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.sites import target_sites
from rslora_jax.methods.rasa import DEFAULT_LAYER_PATTERN, DIAG, SHARED, RaSA, RasaGroup


def groups(params: PyTree, config: LoraConfig, paths: list[str] | None = None) -> list[RasaGroup]:
    """The RaSA groups (layers of one module type sharing a pool) of `params` under `config`.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"layers": {str(i): {"q": {"kernel": jnp.ones((8, 6))}} for i in range(3)}}
      >>> g, = groups(p, LoraConfig(rank=4, rasa=True))
      >>> g.module, g.paths, g.num_layers, g.k
      ('layers/q', ('layers/0/q', 'layers/1/q', 'layers/2/q'), 3, 1)
    """
    method = config.method if isinstance(config.method, RaSA) else RaSA()
    sites = target_sites(params, config)
    if paths is not None:
        sites = [s for s in sites if s.path in set(paths)]
    return method.groups(sites, config)


__all__ = ["DEFAULT_LAYER_PATTERN", "DIAG", "SHARED", "RaSA", "RasaGroup", "groups"]
