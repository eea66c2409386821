"""The model zoo. Each family module registers its variants when imported here."""

from hybrid_jax.models import resnet, vit  # noqa: F401  (registration)
from hybrid_jax.models import mobile_former  # noqa: F401  (registration)
