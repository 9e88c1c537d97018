"""``lpm serve``: run a local OpenAI-compatible model server until interrupted; ``--check URL``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from lpm.cli.display import console
from lpm.server_kind import SERVER_KINDS, server_kind


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        kind: str = typer.Option(
            "vllm",
            "--server",
            help=f"server kind: {'|'.join(SERVER_KINDS)} (vllm: the CPU build without a GPU)",
        ),
        model: Path = typer.Option(
            None, "--model", help="model folder (vllm) or .gguf file; default SmolLM2-135M-Instruct"
        ),
        name: str = typer.Option(None, "--name", help="name the model is served under"),
        port: int = typer.Option(None, "--port", help="TCP port on 127.0.0.1 (default: a free one)"),
        kv_cache_gib: int = typer.Option(2, "--kv-cache-gib", help="KV cache of the CPU build of vLLM, GiB"),
        check: str = typer.Option(
            None, "--check", metavar="URL", help="only report the health of the server at URL"
        ),
    ) -> None:
        """Start a local model server on 127.0.0.1, print its URL and model, serve until Ctrl-C."""
        from lpm.server import ModelServer, check_server

        if check:  # anything but an OpenAI-compatible server that answers is an error (exit 2)
            import os

            info = check_server(check, api_key=os.environ.get("OPENAI_API_KEY"))
            if not info["models"]:
                from lpm.errors import ServerError

                raise ServerError(
                    f"{info['url']} is an OpenAI-compatible server, but it serves no models (its /models list is "
                    "empty)",
                    hint="load a model on it, or check the URL",
                )
            console.print(f"{info['url']}: healthy, serving {', '.join(info['models'])}")
            return
        server = ModelServer(
            server_kind(kind, field="--server"), model, name, port=port, kv_cache_gib=kv_cache_gib
        )
        with console.status(f"starting {server.kind.label} server (logs: {server.log_path})"):
            server.start()
        try:
            console.print(
                f"serving {server.model} at {server.url}  (server {server.kind.name}, started in "
                f"{server.startup_seconds:.0f} s; Ctrl-C stops it)"
            )
            console.print(
                f"  use: lpm run covid --policy llm --llm-url {server.url} --llm-model {server.model}"
            )
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, kill: stop the server cleanly
                signal.signal(sig, lambda *_: stop.set())
            while not stop.wait(1.0):
                if not server.running:
                    from lpm.errors import ServerError
                    from lpm.server import log_tail

                    raise ServerError(
                        f"the {server.kind.label} server exited unexpectedly:\n{log_tail(server.log_path)}"
                    )
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
            console.print("server stopped")
