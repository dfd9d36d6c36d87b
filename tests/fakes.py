"""Hand-built policy inputs shared by the policy tests."""

from dataclasses import dataclass, field

from policies.base import ReplicaState


@dataclass
class FakeView:
    """A hand-built ReplicaView; ``cached`` holds the block hashes the replica truly caches."""

    replica_id: int
    state: ReplicaState = ReplicaState.SERVING
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 1000
    num_total_blocks: int = 1000
    block_size: int = 16
    inflight_requests: int = 0
    inflight_tokens: int = 0
    cached: set = field(default_factory=set)

    def cached_prefix_blocks(self, block_hashes) -> int:
        n = 0
        for h in block_hashes:
            if h not in self.cached:
                break
            n += 1
        return n


class ScriptedAutoscaler:
    """An autoscaler that follows a fixed schedule of desired sizes (tests the cluster mechanics)."""

    name = "scripted"
    sync_period_s = 5.0

    def __init__(self, plan):
        self.plan = plan  # list of (from_time, desired)

    def desired(self, now, cluster):
        d = cluster.current
        for t, n in self.plan:
            if now >= t:
                d = n
        return d
