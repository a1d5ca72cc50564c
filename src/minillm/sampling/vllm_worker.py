"""minillm's vLLM worker: run as a FILE by the python of an environment that has vLLM (`vllm_python FD`).

It imports only the standard library and vLLM (vLLM pins transformers < 5.20, minillm 5.24, so the two
usually live in separate environments: nothing of minillm is imported here). The client
(`minillm.sampling.vllm_client.VLLMEngine`) passes one end of a socket pair as file descriptor FD and talks
to it with `multiprocessing.connection` messages, plain dicts of lists / numbers / strings:

    client -> worker                                  worker -> client
    {"op": "start", "engine": {LLM(...) kwargs}}      {"ok": True, "info": {...}}        (once, first)
    {"op": "generate", "prompts": [[ids]],            {"ok": True, "outputs": [{"token_ids", "logprobs",
     "params": [{SamplingParams kwargs}],               "finish_reason"}]}
     "lora": {"name", "id", "path"} | None}
    {"op": "load_weights", "path": folder}            {"ok": True, "seconds": s}
    {"op": "remove_lora", "id": n}                    {"ok": True}
    {"op": "shutdown"}                                {"ok": True}, then the worker exits

Every failure answers {"ok": False, "kind": "import" | "error", "error": "Type: message", "traceback": ...}
instead. vLLM's own log goes to this process's stdout / stderr, which the client keeps in a file, reads to
tell what went wrong (the root cause of an engine-core failure is only in the log) and quotes.
"""

import os
import sys
import time
import traceback

# The script's folder (minillm/sampling) is sys.path[0] when run as a file: drop it, so that nothing here
# shadows a top-level module vLLM imports.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from multiprocessing.connection import Connection  # noqa: E402


def _failure(exc: BaseException, kind: str = "error") -> dict:
    return {"ok": False, "kind": kind, "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()}


def _start(options: dict):
    from vllm import LLM
    from vllm.platforms import current_platform

    if current_platform.is_cpu():  # no CUDA graphs to capture; torch.compile would only slow the start
        options = {**options, "enforce_eager": True}
    llm = LLM(**options)
    info = {"vllm_version": __import__("vllm").__version__, "device": str(current_platform.device_name),
            "max_model_len": llm.llm_engine.model_config.max_model_len}
    return llm, info


def _generate(llm, request: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in request["prompts"]]
    params = [SamplingParams(**p) for p in request["params"]]
    lora = None
    if request.get("lora"):
        from vllm.lora.request import LoRARequest

        spec = request["lora"]
        lora = LoRARequest(spec["name"], int(spec["id"]), spec["path"])
    results = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    outputs = []
    for result in results:
        completion = result.outputs[0]
        ids = list(completion.token_ids)
        logprobs = []
        for token, entry in zip(ids, completion.logprobs or []):
            logprobs.append(float(entry[token].logprob) if token in entry else float("nan"))
        outputs.append({"token_ids": ids, "logprobs": logprobs, "finish_reason": completion.finish_reason})
    return {"ok": True, "outputs": outputs}


def _load_weights(llm, request: dict) -> dict:
    start = time.perf_counter()
    llm.collective_rpc("reload_weights",
                       kwargs={"weights_path": request["path"], "is_checkpoint_format": True})
    llm.reset_prefix_cache()
    return {"ok": True, "seconds": time.perf_counter() - start}


def _remove_lora(llm, request: dict) -> dict:
    llm.llm_engine.remove_lora(int(request["id"]))
    return {"ok": True}


HANDLERS = {"generate": _generate, "load_weights": _load_weights, "remove_lora": _remove_lora}


def serve(conn: Connection) -> int:
    first = conn.recv()
    if first.get("op") != "start":
        conn.send({"ok": False, "kind": "error", "error": f"expected a start message, got {first!r}",
                   "traceback": ""})
        return 2
    try:
        import vllm  # noqa: F401
    except BaseException as exc:  # ImportError, or a RuntimeError from a mismatched torchvision
        conn.send(_failure(exc, "import"))
        return 3
    try:
        llm, info = _start(first["engine"])
    except BaseException as exc:
        conn.send(_failure(exc))
        return 4
    conn.send({"ok": True, "info": info})
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the client is gone
            return 0
        op = request.get("op")
        if op == "shutdown":
            conn.send({"ok": True})
            return 0
        handler = HANDLERS.get(op)
        try:
            reply = handler(llm, request) if handler else {"ok": False, "kind": "error",
                                                           "error": f"unknown op {op!r}", "traceback": ""}
        except BaseException as exc:
            reply = _failure(exc)
        conn.send(reply)


def main(argv: list) -> int:
    if len(argv) != 2:
        print("usage: vllm_worker.py FD  (started by minillm.sampling.vllm_client.VLLMEngine)",
              file=sys.stderr)
        return 2
    conn = Connection(int(argv[1]))
    try:
        return serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":  # vLLM starts its engine in child processes: the guard keeps them from re-running
    sys.exit(main(sys.argv))
