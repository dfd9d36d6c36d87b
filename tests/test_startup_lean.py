"""Start-up and shut-down of ``fleetsim run`` outside the event loop (docs/performance.md).

- a run imports only the router module it uses, and the table saying which module registers which
  built-in router is complete;
- the CLI imports the simulator with the garbage collector paused and leaves the collector as it
  found it;
- the ``fleetsim`` entry point still flushes its output and keeps its exit codes although it
  freezes the collector before the interpreter shuts down.
"""

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    prog = "import sys\nsys.path.insert(0, %r)\n" % str(ROOT) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300)


def test_a_run_imports_only_the_router_it_uses():
    out = _python("""
        from policies.registry import make_router
        make_router("round-robin")
        print(" ".join(m for m in sys.modules if m.startswith("policies.routers.")))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["policies.routers.basic"]


def test_router_module_table_is_complete_and_each_name_loads_alone():
    out = _python("""
        from policies import registry
        for name, mod in registry._ROUTER_MODULE_OF.items():
            registry._load_builtin_routers(name)
            assert name in registry.ROUTERS, name
            assert registry.ROUTERS[name].__module__ == "policies.routers." + mod, (name, mod)
        registry._load_builtin_routers()
        assert set(registry.ROUTERS) == set(registry._ROUTER_MODULE_OF), sorted(registry.ROUTERS)
        assert set(registry._ROUTER_MODULE_OF.values()) == set(registry._ROUTER_MODULES)
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_router_error_still_lists_every_builtin():
    out = _python("""
        from policies.registry import make_router
        from sim.errors import ConfigError
        try:
            make_router("nope")
        except ConfigError as e:
            print(e)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "router.policy: unknown router 'nope'; known: ['hybrid', 'least-kv', 'least-loaded', 'least-requests', "
        "'power-of-two', 'prefix-aware', 'random', 'round-robin', 'sticky']")


def test_gc_paused_restores_the_collector():
    from sim.cli import _gc_paused

    assert gc.isenabled() and gc.get_freeze_count() == 0
    with _gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        with _gc_paused():
            pass
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.enable()


def test_gc_paused_leaves_a_callers_frozen_set_alone():
    out = _python("""
        import gc
        gc.freeze()
        n = gc.get_freeze_count()
        from sim.cli import _gc_paused
        with _gc_paused():
            x = [[] for _ in range(1000)]
        assert gc.get_freeze_count() == n and gc.isenabled()
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_entry_point_flushes_output_and_keeps_exit_codes():
    ok = _python("""
        sys.argv = ["fleetsim", "run", "--json", "--no-progress", "--set", "workload.synthetic.num_requests=5",
                    "--set", "workload.synthetic.rate_per_s=2"]
        from sim.cli import main
        main()
    """)
    assert ok.returncode == 0, ok.stderr
    assert '"requests_completed": 5' in ok.stdout and ok.stdout.endswith("}\n")
    bad = _python("""
        sys.argv = ["fleetsim", "run", "--set", "router.policy=nope"]
        from sim.cli import main
        main()
    """)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: router.policy: unknown router 'nope'") and bad.stderr.count("\n") == 1
