"""Optimal transport kernels (entropic Sinkhorn, Norton's prompt bucket)."""

from vatt_jax.ot.sinkhorn import SinkhornOutput, bucket_sinkhorn, marginal_error, sinkhorn

__all__ = ['SinkhornOutput', 'bucket_sinkhorn', 'marginal_error', 'sinkhorn']
