"""Matched-compute ablation of CNN + ViT integration patterns and fusions (issue 7); see README.md here."""
