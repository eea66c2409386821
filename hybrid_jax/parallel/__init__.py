"""Device meshes and the logical-axis rules that place parameters and activations on them."""

from hybrid_jax.parallel.mesh import MESH_AXES, make_mesh
from hybrid_jax.parallel.rules import DEFAULT_RULES, logical_shardings, sharded_init
