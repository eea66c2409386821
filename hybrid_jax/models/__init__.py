"""The model zoo. Each family module registers its variants when imported here."""

from hybrid_jax.models import resnet, vit  # noqa: F401  (registration)
