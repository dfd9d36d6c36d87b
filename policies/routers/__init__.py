"""Built-in routers. Each module registers its routers on import; ``policies.registry`` imports them
(only the one a scenario names for a run, all of them for listings)."""
