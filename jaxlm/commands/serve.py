"""`jaxlm serve`: a run's checkpoint behind a JSON-over-HTTP API (jaxlm.serve)."""

import argparse
import signal

from jaxlm import console
from jaxlm.commands import common
from jaxlm.errors import UserError

NAME = "serve"
HELP = "answer generate / classify requests over HTTP with a run's checkpoint"
DESCRIPTION = ("Serve a causal-LM run (POST /v1/generate) or a classification run (POST /v1/classify) over "
               "HTTP with JSON bodies; GET /health and GET /v1/model describe it. Outputs are those of "
               "`jaxlm generate` and `jaxlm predict` for the same input. Requests run one at a time, each "
               "batching its own prompts or texts. SIGINT or SIGTERM stops the server.")
NEEDS = ("workdir",)


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed)")
    parser.add_argument("--max_batch", type=int, default=64, help="prompts or texts per request at most")
    parser.add_argument("--max_new_tokens", type=int, default=128,
                        help="tokens to generate when a request does not say")


class _Stop(Exception):
    pass


def _stop(signum, frame):  # pylint: disable=unused-argument
    raise _Stop()


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import bucket_probe, serve  # pylint: disable=import-outside-toplevel
    if args.max_batch < 1 or args.max_new_tokens < 1:
        raise UserError("--max_batch and --max_new_tokens must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port}: give a port from 0 to 65535")
    bucket_probe.check_reachable(args.workdir)  # One line, not gcsfs's 33 s of retries.
    server = serve.bind(args.host, args.port)
    try:
        console.log_to_workdir(args.workdir)
        service = serve.Service(args.workdir, overrides, step=args.step, best=args.best,
                                max_batch=args.max_batch, max_new_tokens=args.max_new_tokens)
        service.warm_up()
        serve.attach(server, service)
        host, port = server.server_address[:2]
        print(f"serving {args.workdir} (step {service.step}, {service.task_name}) at http://{host}:{port}: "
              f"POST {service.endpoint}, GET /v1/model; Ctrl-C stops", flush=True)
        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            server.serve_forever()
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
        print(f"stopped serving {args.workdir}", flush=True)
    finally:
        server.server_close()
    return 0
