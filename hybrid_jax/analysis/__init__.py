"""Measurement and analysis tools: FLOPs, benchmarks, interpretability."""
