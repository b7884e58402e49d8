"""`jaxlm serve`: a finished run's model behind a small JSON-over-HTTP API.

    GET  /health        {"status": "ok"}
    GET  /v1/model      the run: workdir, task, step, and its labels (classifier) or context (causal LM)
    POST /v1/generate   causal LM. {"prompt": "…"} or {"prompts": ["…", …]}; max_new_tokens,
                        temperature (0: greedy), top_k, top_p, seed as in `jaxlm generate`
                        -> {"step", "completions": [{"prompt", "text", "new_tokens", "stopped"}]}
    POST /v1/classify   classifier. {"text": "…"} or {"texts": [...]}, and "text_pair(s)" for a
                        pair classifier -> {"step", "labels", "predictions": [{"label", "score", "probs"}]}

The model is opened once through the path every command uses (run.find_run, then
generate.generator_of or predict.classifier_of), so a request's output is what `jaxlm generate` /
`jaxlm predict` give for the same input. Requests run one at a time (a lock): each batches its own
prompts or texts, and each new batch shape compiles once (classify pads a batch to a power of two
rows, so few shapes exist). The standard library's HTTP server: no web framework for four routes.
A bad request is a 400 whose "error" names the field; nothing a client sends stops the server.
"""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from absl import logging

from jaxlm import generate, predict
from jaxlm import run as run_lib
from jaxlm.data.tokenizer import eos_id
from jaxlm.errors import UserError
from jaxlm.tasks import get_task

MAX_BODY_BYTES = 8 << 20


class RequestError(Exception):
    """A client's mistake: HTTP `status` with a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _strings(body: dict, one: str, many: str, limit: int, required: bool = True) -> Optional[list[str]]:
    """body[one] (a string) or body[many] (a non-empty list of strings), as a list."""
    if one in body and many in body:
        raise RequestError(f"give {one!r} or {many!r}, not both")
    if one in body:
        value = [body[one]]
    elif many in body:
        value = body[many]
        if not isinstance(value, list) or not value:
            raise RequestError(f"{many!r} must be a non-empty list of strings")
    elif required:
        raise RequestError(f"the request needs {one!r} (a string) or {many!r} (a list of strings)")
    else:
        return None
    if not all(isinstance(v, str) for v in value):
        raise RequestError(f"{one!r} / {many!r}: every item must be a string")
    if len(value) > limit:
        raise RequestError(f"{many!r}: {len(value)} items; at most {limit} per request (the server's --max_batch)")
    return value


def _number(body: dict, name: str, default, kind: type, low=None, high=None):
    value = body.get(name, default)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (kind is float or float(value).is_integer()))
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" from {low}" if low is not None else ""
        bounds += f" to {high}" if high is not None else ""
        raise RequestError(f"{name!r} must be {'an integer' if kind is int else 'a number'}{bounds}; got {value!r}")
    return kind(value)


class Service:
    """One run's model and the requests it answers (HTTP-free, so it is testable on its own)."""

    def __init__(self, workdir: str, overrides: dict[str, str], *, step: Optional[int] = None, best: bool = False,
                 max_batch: int = 64, max_new_tokens: int = 128):
        found = run_lib.find_run(workdir, step=step, best=best, overrides=overrides)
        task = get_task(found.config.task)
        self.workdir, self.task_name = workdir, found.config.task
        self.max_batch, self.max_new_tokens = max_batch, max_new_tokens
        self._lock = threading.Lock()
        self.classifier = self.generator = None
        if task.can_predict:
            self.classifier = predict.classifier_of(found)
            self.step = self.classifier.step
        elif task.can_generate:
            self.generator, self.tokenizer, self.step = generate.generator_of(found)
            self.eos = eos_id(self.tokenizer)
        else:
            raise UserError(f"--workdir={workdir} holds a {found.config.task} run; serve needs a causal_lm run "
                            "(/v1/generate) or a classification run (/v1/classify)")

    @property
    def endpoint(self) -> str:
        return "/v1/classify" if self.classifier is not None else "/v1/generate"

    def warm_up(self) -> None:
        """Compiles the one-item request's programs, so the first client does not wait for them."""
        if self.classifier is not None:
            self.classify({"text": "warm up"})
        else:
            self.generate({"prompt": "warm up", "max_new_tokens": 2})

    def info(self) -> dict:
        out: dict[str, Any] = {"workdir": self.workdir, "task": self.task_name, "step": self.step,
                               "endpoint": self.endpoint, "max_batch": self.max_batch}
        if self.classifier is not None:
            out.update(labels=list(self.classifier.label_names), max_tokens=self.classifier.seq_len)
        else:
            out.update(context=int(self.generator.cfg.max_len), default_max_new_tokens=self.max_new_tokens)
        return out

    def generate(self, body: dict) -> dict:
        if self.generator is None:
            raise RequestError(f"this {self.task_name} run answers POST {self.endpoint}", 404)
        prompts = _strings(body, "prompt", "prompts", self.max_batch)
        max_new = _number(body, "max_new_tokens", self.max_new_tokens, int, 1)
        sampling = generate.Sampling(_number(body, "temperature", 0.0, float, 0.0), _number(body, "top_k", 0, int, 0),
                                     _number(body, "top_p", 1.0, float, 0.0, 1.0))
        if sampling.top_p == 0:
            raise RequestError("'top_p' must be above 0 (1: off); got 0")
        seed = _number(body, "seed", 0, int, 0, 2 ** 31 - 1)
        with self._lock:  # The tokenizer too: a fast tokenizer is not safe to share between threads.
            ids = generate.encode_prompts(self.tokenizer, prompts)
            longest, context = max(len(p) for p in ids), int(self.generator.cfg.max_len)
            if "max_new_tokens" not in body:  # The default gives way to a long prompt, as in `generate`.
                max_new = max(1, min(max_new, context - longest))
            if longest + max_new > context:
                raise RequestError(f"a prompt of {longest} tokens plus max_new_tokens={max_new} is more than the "
                                   f"model's context of {context} tokens; shorten it or lower max_new_tokens")
            rows = self.generator.generate(ids, max_new, sampling, seed=seed, eos_id=self.eos)
            texts = [self.tokenizer.decode(row) for row in rows]
        completions = [{"prompt": prompt, "text": text, "new_tokens": len(row),
                        "stopped": "eos" if len(row) < max_new else "length"}
                       for prompt, text, row in zip(prompts, texts, rows)]
        return {"step": self.step, "completions": completions}

    def classify(self, body: dict) -> dict:
        if self.classifier is None:
            raise RequestError(f"this {self.task_name} run answers POST {self.endpoint}", 404)
        texts = _strings(body, "text", "texts", self.max_batch)
        pairs = _strings(body, "text_pair", "text_pairs", self.max_batch, required=False)
        if pairs is not None and len(pairs) != len(texts):
            raise RequestError(f"{len(texts)} texts but {len(pairs)} text pairs: give one pair per text")
        rows = 1 << (len(texts) - 1).bit_length()  # A power of two: a handful of compiled shapes.
        with self._lock:
            out = self.classifier.predict(texts, pairs, batch_size=rows)
        names = self.classifier.label_names
        predictions = [{"label": names[label], "score": float(probs[label]),
                        "probs": {name: float(p) for name, p in zip(names, probs)}}
                       for label, probs in zip(out.labels.tolist(), out.probs)]
        return {"step": self.step, "labels": list(names), "predictions": predictions}


class _Handler(BaseHTTPRequestHandler):
    service: Optional[Service] = None  # Set once the model is loaded (the port is bound first).
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._started = time.monotonic()
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/model":
            self._send(200, self.service.info())
        else:
            self._send(404, {"error": f"no GET {self.path}; try GET /health, GET /v1/model or POST "
                                      f"{self.service.endpoint}"})

    def do_POST(self) -> None:  # noqa: N802
        self._started = time.monotonic()
        routes = {"/v1/generate": self.service.generate, "/v1/classify": self.service.classify}
        try:
            header = self.headers.get("Content-Length") or "0"
            length = int(header) if header.strip().isdigit() else -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True  # The body stays unread: the connection ends with this answer.
                raise RequestError(f"Content-Length {header!r}: give the body's size in bytes, at most "
                                   f"{MAX_BODY_BYTES}", 413 if length > MAX_BODY_BYTES else 400)
            raw = self.rfile.read(length)
            if self.path not in routes:
                raise RequestError(f"no POST {self.path}; this run answers POST {self.service.endpoint}", 404)
            try:
                body = json.loads(raw or b"{}")
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RequestError(f"the body is not JSON ({e})") from None
            if not isinstance(body, dict):
                raise RequestError("the body must be a JSON object")
            self._send(200, routes[self.path](body))
        except RequestError as e:
            self._send(e.status, {"error": str(e)})
        except UserError as e:  # The library's own check of this input (e.g. a prompt with no tokens).
            self._send(400, {"error": str(e)})
        except Exception as e:  # pylint: disable=broad-except  # One request fails, not the server.
            logging.exception("serve: %s failed", self.path)
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        logging.info("serve: %s %s %s %d (%.3f s)", self.address_string(), self.command, self.path, status,
                     time.monotonic() - self._started)

    def log_request(self, code="-", size="-") -> None:
        pass  # _send logs each answer, with its time.

    def log_message(self, format: str, *args) -> None:  # noqa: A002  # http.server's own errors.
        logging.info("serve: %s %s", self.address_string(), format % args)


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """The server listening on host:port (0: a free port), before any model is loaded: a taken
    port is one line at once, not after a minute of loading."""
    handler = type("Handler", (_Handler,), {})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise UserError(f"--host={host} --port={port}: cannot listen there ({e.strerror or e}); "
                        "pick another --port, or stop what uses it") from None
    server.daemon_threads = True
    return server


def attach(server: ThreadingHTTPServer, service: Service) -> None:
    server.RequestHandlerClass.service = service
