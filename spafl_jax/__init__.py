"""SpaFL in JAX."""
