"""Studies built on hybrid_jax: one folder per study, each with its sweep config, code and committed results."""
