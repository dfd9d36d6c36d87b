"""Built-in routers. Each module registers its routers on import."""

from policies.routers import basic  # noqa: F401
