"""Local SGLang servers as subprocesses, for tests and benchmarks.

SGLang keeps process-global runtime state, so two ``sglang.Engine`` objects cannot live
in one process; a ``launch_server`` subprocess per configuration isolates them, lets
several stay warm at once, and exercises the real HTTP path users run. The defaults
are the CPU lane's (``CPU_ARGS``); pass ``base_args={}`` for a GPU machine.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import requests

from ..cpu_lane import CPU_ENV

CPU_ARGS = {
    "device": "cpu",
    "attention-backend": "torch_native",
    "disable-cuda-graph": True,
    # The CPU engine sizes the KV pool as free memory now minus (1 - fraction) of free
    # memory before loading: 0.25 leaves room for the weights and for other processes,
    # and --max-total-tokens then caps the pool at what was asked for.
    "mem-fraction-static": 0.25,
    "max-total-tokens": 8192,
    "dtype": "float32",
    "random-seed": 0,
    "log-level": "warning",
    # An idle CPU-lane scheduler otherwise busy-polls a whole core.
    "sleep-on-idle": True,
}


def _die_with_parent() -> None:
    """Linux: SIGTERM the server when the test process dies, even by SIGKILL, so an
    interrupted run leaves no server spinning."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, wait: float = 30) -> None:
    """SIGTERM, then SIGKILL, a server's process group; quiet if it has already gone
    (a server that died at start-up must not turn the report into ProcessLookupError)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def cli_args(options: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        args.append(f"--{key}")
        if value is not True:
            args.append(str(value))
    return args


@dataclass
class Server:
    options: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    base_args: dict[str, Any] = field(default_factory=lambda: dict(CPU_ARGS))
    port: int = 0
    proc: Optional[subprocess.Popen] = None
    log_path: Optional[Path] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> "Server":
        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="sglang-server-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "sglang.launch_server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += cli_args({**self.base_args, **self.options})
        env = {**os.environ, **(CPU_ENV if self.base_args.get("device") == "cpu" else {}), **self.env}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ---------------------------------------------------------------- requests
    def generate(self, prompts, sampling_params: dict, *, timeout: float = 600, **extra) -> list[dict]:
        """POST /generate with a batch of prompts (text or token-id lists)."""
        key = "input_ids" if prompts and isinstance(prompts[0], list) else "text"
        body = {key: prompts, "sampling_params": sampling_params, **extra}
        resp = requests.post(f"{self.url}/generate", json=body, timeout=timeout)
        resp.raise_for_status()
        out = resp.json()
        return out if isinstance(out, list) else [out]

    def generate_one(self, prompt, sampling_params: dict, **extra) -> dict:
        return self.generate([prompt], sampling_params, **extra)[0]

    def stream(self, prompt: str, sampling_params: dict, timeout: float = 600):
        """Yield each streamed chunk (dict) of one request."""
        body = {"text": prompt, "sampling_params": sampling_params, "stream": True}
        with requests.post(f"{self.url}/generate", json=body, stream=True, timeout=timeout) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
                    yield json.loads(line[5:])

    def server_info(self) -> dict:
        return requests.get(f"{self.url}/server_info", timeout=60).json()

    def dflash_state(self) -> Optional[dict]:
        states = self.server_info().get("internal_states") or [{}]
        return states[0].get("dflash")

    def flush_cache(self, wait_s: float = 60.0) -> None:
        """Empty the radix cache, waiting up to ``wait_s`` for running requests (an
        aborted stream may still be finishing) to end: SGLang flushes only when idle."""
        resp = requests.post(f"{self.url}/flush_cache", params={"timeout": wait_s}, timeout=wait_s + 60)
        if resp.status_code != 200:
            raise RuntimeError(f"flush_cache failed: {resp.text.strip()}")


class ServerPool:
    """Keeps at most ``capacity`` servers alive, keyed by their options."""

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self._servers: dict[str, Server] = {}

    def get(self, options: dict[str, Any], env: Optional[dict[str, str]] = None) -> Server:
        key = json.dumps([options, env or {}], sort_keys=True, default=str)
        server = self._servers.pop(key, None)
        if server is None or not server.alive():
            while len(self._servers) >= self.capacity:
                oldest = next(iter(self._servers))
                self._servers.pop(oldest).stop()
            server = Server(options=dict(options), env=dict(env or {})).start()
        self._servers[key] = server  # most recently used last
        return server

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


# ------------------------------------------------------------------ PD disaggregation
# Mooncake's transfer engine over TCP (no RDMA device): what a CPU-only machine can run.
MOONCAKE_TCP_ENV = {"MOONCAKE_PROTOCOL": "tcp", "MC_FORCE_TCP": "1"}


def mooncake_env() -> dict[str, str]:
    """Environment for SGLang's Mooncake backend on this machine: TCP transport, and the
    RDMA user-space libraries ``make install`` unpacks next to the venv (the wheel links
    libibverbs even when it never opens a device)."""
    env = dict(MOONCAKE_TCP_ENV)
    libs = Path(sys.prefix) / "pd-sysroot" / "lib"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    return env


@dataclass
class PDPair:
    """A prefill server and a decode server on 127.0.0.1, paired through SGLang's
    bootstrap server, and the few lines of routing a PD router does: each request goes
    to both with the prefill's bootstrap address and a fresh room; the decode server's
    answer is the response."""

    options: dict[str, Any]
    backend: str = "mooncake"
    env: dict[str, str] = field(default_factory=dict)
    prefill: Optional[Server] = None
    decode: Optional[Server] = None
    bootstrap_port: int = 0

    def start(self, timeout: float = 400.0) -> "PDPair":
        env = {**(mooncake_env() if self.backend == "mooncake" else {}), **self.env}
        self.bootstrap_port = free_port()
        common = {**self.options, "disaggregation-transfer-backend": self.backend}
        self.prefill = Server(
            options={**common, "disaggregation-mode": "prefill", "disaggregation-bootstrap-port": self.bootstrap_port},
            env=env,
        )
        # The decode side's default retraction backup pins host memory through CUDA.
        self.decode = Server(
            options={**common, "disaggregation-mode": "decode", "disaggregation-decode-retraction-backup": "cpu_tensor"},
            env=env,
        )
        try:
            self.prefill.start(timeout)
            self.decode.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in (self.prefill, self.decode):
            if server is not None:
                server.stop()

    def generate_one(self, prompt, sampling_params: dict, timeout: float = 600) -> dict:
        import random
        from concurrent.futures import ThreadPoolExecutor

        key = "input_ids" if isinstance(prompt, list) else "text"
        body = {
            key: prompt,
            "sampling_params": sampling_params,
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": self.bootstrap_port,
            "bootstrap_room": random.randrange(1 << 62),
        }

        def post(server: Server) -> dict:
            resp = requests.post(f"{server.url}/generate", json=body, timeout=timeout)
            resp.raise_for_status()
            return resp.json()

        with ThreadPoolExecutor(max_workers=2) as pool:
            first, answer = pool.submit(post, self.prefill), pool.submit(post, self.decode)
            first.result()
            return answer.result()
