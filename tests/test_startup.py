"""Start-up cost: ``fleetsim run`` imports only what its path needs.

Imports are most of the fixed cost of a run (docs/performance.md); these tests keep the lazy ones
lazy, in a fresh interpreter so that other tests' imports do not hide a regression.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _modules_after(code: str) -> set[str]:
    prog = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        {code}
        print("\\n".join(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def test_building_the_default_scenario_imports_no_unused_policy_or_reader():
    mods = _modules_after("""
        import sim.cli
        from sim.build import build_cluster_config
        from sim.scenario import load_scenario
        build_cluster_config(load_scenario(None))
    """)
    assert "traces.formats.azure" in mods  # the default trace's reader is loaded ...
    unused = {"policies.autoscalers", "traces.formats.native", "traces.formats.vllm_bench",
              "traces.formats.mooncake", "pyarrow.parquet", "scipy", "tqdm", "rich"}
    assert not unused & mods  # ... and nothing it does not use


def test_lazy_loaders_still_register_everything():
    mods = _modules_after("""
        from policies.registry import AUTOSCALERS, ROUTERS, _load_builtin, make_autoscaler
        make_autoscaler("hpa", min_replicas=1, max_replicas=2)
        assert "policies.routers" not in sys.modules  # an autoscaler does not need the routers
        _load_builtin()
        assert {"round-robin", "prefix-aware"} <= set(ROUTERS) and {"none", "hpa"} <= set(AUTOSCALERS)
        from traces.formats import LOADERS, detect
        assert callable(LOADERS["parquet"])
    """)
    assert "policies.routers.basic" in mods
