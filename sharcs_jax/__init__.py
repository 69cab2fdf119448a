"""sharcs_jax: SHARCS sample-adaptive width inference for transformer encoders in JAX/Flax."""
