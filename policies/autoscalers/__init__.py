"""Built-in autoscalers. Each module registers its autoscalers on import."""

from policies.autoscalers import basic, hpa, kpa, ray_serve, saturation  # noqa: F401
