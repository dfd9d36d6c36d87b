"""Step-by-step scheduler parity between fleetsim's engine and vLLM's own V1 Scheduler."""
