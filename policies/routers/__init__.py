"""Built-in routers. Each module registers its routers on import."""

from policies.routers import basic, hybrid, load_aware, prefix_aware, sticky  # noqa: F401
