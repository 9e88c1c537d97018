"""Run llama.cpp's OpenAI-compatible HTTP server (the ``xllamacpp`` wheel) as a process of its own.

``xllamacpp.Server`` starts llama-server inside the calling Python process. :class:`lpm.server.ModelServer`
runs this module in a subprocess so that the server can be stopped (and cleaned up) like any other. It
takes the options of vLLM's server that :class:`lpm.server.ModelServer` gives every server kind::

    python -m lpm.llamacpp_server --model FILE.gguf --served-model-name NAME --host 127.0.0.1 --port 8080

The server answers until SIGTERM or SIGINT. Differences from vLLM that clients must know: logprobs come in
llama-server's shape (``choices[i].logprobs.content[j]`` with ``id``/``token``/``bytes``/``logprob``, also on
``/v1/completions``); a choice is constrained with a GBNF ``grammar`` field; the first token's probabilities
*after* the grammar mask come only with ``post_sampling_probs: true`` and a temperature above 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from lpm.server_kind import SERVERS


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the llama.cpp server process."""
    parser = argparse.ArgumentParser(
        prog="python -m lpm.llamacpp_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True, help="path of the .gguf file to serve")
    parser.add_argument(
        "--served-model-name", required=True, help="model name clients send (listed by /v1/models)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0: every core this process may use)"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=1024, help="context length per request (parallel slot), tokens"
    )
    parser.add_argument(
        "--parallel", type=int, default=32, help="requests decoded at once (continuous batching)"
    )
    return parser


def serve(args: argparse.Namespace) -> int:
    """Start the server described by ``args`` and block until SIGTERM/SIGINT; return the exit status."""
    try:
        import xllamacpp
    except ImportError:
        print(
            "lpm.llamacpp_server: the package xllamacpp is not installed; "
            f"install it with `{SERVERS['llamacpp'].install}` (or `pip install -e '.[cpu]'`).",
            file=sys.stderr,
        )
        return 2
    if not os.path.isfile(args.model):
        print(f"lpm.llamacpp_server: model file {args.model} does not exist.", file=sys.stderr)
        return 2

    threads = args.threads or len(os.sched_getaffinity(0))
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.served_model_name}  # llama-server takes a set of names
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.max_model_len * args.parallel  # llama-server splits n_ctx across the slots
    params.cont_batching = True
    params.endpoint_metrics = True
    if os.environ.get("LPM_SERVER_API_KEY"):  # from the environment, so it shows in no process list
        params.api_keys = [os.environ["LPM_SERVER_API_KEY"]]
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = xllamacpp.Server(params)
    print(
        f"lpm.llamacpp_server: serving {args.model} as {args.served_model_name!r} at {server.listening_address}",
        flush=True,
    )
    while not stop.wait(timeout=1.0):
        pass
    del server
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lpm.llamacpp_server``."""
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
