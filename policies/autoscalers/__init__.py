"""Built-in autoscalers. Each module registers its autoscalers on import."""

from policies.autoscalers import basic  # noqa: F401
