"""`kvflow serve`: build the engine config, start uvicorn, and shut down cleanly on SIGTERM.

Startup order: the server's socket is bound first, so a taken address fails in a moment rather than
after the model has loaded; then the app's lifespan starts the engine (a failure is one line, exit 1);
then uvicorn listens on that same socket. Until then connections are refused.

Shutdown order on SIGTERM / Ctrl-C: uvicorn stops accepting connections and lets in-flight
responses finish (up to --shutdown-timeout, then cancels them, which aborts their requests);
the app's lifespan then stops the engine-core process. The process exits 0. A signal before
the engine is ready stops it at once (exit 128 + the signal's number).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from kvflow.cli.engine_args import add_engine_args, engine_kwargs, model_path
from kvflow.config import KV_TRANSFER_MODES, KV_TRANSPORTS, KVTransferConfig
from kvflow.disagg.deployment import PLACEMENT_STRATEGIES, DeploymentSpec

DEFAULT_MAX_WAITING = 1024

logger = logging.getLogger(__name__)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port)")
    parser.add_argument("--api-key", default=os.environ.get("KVFLOW_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $KVFLOW_API_KEY)")
    parser.add_argument("--allow-runtime-lora", action="store_true",
                        help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --api-key and "
                             "--enable-lora)")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: --model)")
    parser.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING,
                        help="sequences (prompts x n) admitted but not yet started that may wait at once; more "
                             "get 503 + Retry-After, a request with more sequences than this a 400")
    parser.add_argument("--max-request-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds to let in-flight requests finish after SIGTERM")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="kvflow's and uvicorn's log level (debug: an engine that fails to start logs why in full)")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="log every HTTP request")
    parser.add_argument("--step-log", default=None, metavar="FILE",
                        help="append one JSON line per engine step (time, prompt chunks, decode contexts); "
                             "disaggregated: FILE.<instance>.jsonl per instance. `kvflow profile --serve` fits these")
    disagg = parser.add_argument_group("disaggregated serving (prefill and decode instances behind one front)")
    disagg.add_argument("--disagg", action="store_true", help="run --prefill N prefill and --decode M decode instances")
    disagg.add_argument("--prefill", type=int, default=1, help="prefill instances (with --disagg)")
    disagg.add_argument("--decode", type=int, default=1, help="decode instances (with --disagg)")
    kv = KVTransferConfig()  # the flags' defaults are the config's
    disagg.add_argument("--kv-transport", choices=KV_TRANSPORTS, default=kv.transport,
                        help="tcp: KV bytes over sockets (works across hosts); shm: shared memory (one host)")
    disagg.add_argument("--kv-transfer-mode", choices=KV_TRANSFER_MODES, default=kv.mode,
                        help="layerwise: send each layer as soon as it is computed (Splitwise); "
                             "whole: after the whole prompt (DistServe)")
    disagg.add_argument("--kv-transfer-timeout", type=float, default=kv.timeout_s,
                        help="seconds a transfer may stall before both sides free its blocks")
    disagg.add_argument("--kv-host", default=kv.host, help="address prefill instances listen on for KV pulls")
    disagg.add_argument("--pin-cores", action="store_true",
                        help="pin each instance to its own share of this process's CPU cores")
    disagg.add_argument("--deployment", type=Path, default=None, metavar="FILE",
                        help="instances (role, CPUs, GPUs, node) and placement strategy as JSON, e.g. from "
                             "`kvflow plan`; replaces --prefill/--decode and the --ray-* sizes")
    disagg.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="run the instances as actors of this Ray cluster (HEAD_IP:6379, or 'auto')")
    disagg.add_argument("--ray-placement-strategy", choices=PLACEMENT_STRATEGIES, default="PACK",
                        help="how Ray spreads the instances' bundles over nodes")
    disagg.add_argument("--ray-placement-timeout", type=float, default=120.0,
                        help="seconds to wait for the cluster to fit every instance's bundle before giving up")
    disagg.add_argument("--ray-cpus-per-instance", type=float, default=1.0,
                        help="CPUs reserved for (and threads used by) each instance on Ray")
    disagg.add_argument("--ray-gpus-per-instance", type=float, default=None,
                        help="GPUs reserved for each instance on Ray (default: 1 with --device cuda, else 0)")


def _deployment(args: argparse.Namespace) -> DeploymentSpec:
    if args.deployment is not None:
        return DeploymentSpec.load(args.deployment)
    gpus = args.ray_gpus_per_instance
    if gpus is None:
        gpus = 1.0 if args.ray_address and str(args.device).startswith("cuda") else 0.0
    return DeploymentSpec.from_counts(args.prefill, args.decode, args.ray_cpus_per_instance, gpus,
                                      args.ray_placement_strategy)


def _address(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not yet listening (connections are refused until the engine is ready):
    a taken address fails here, at once, rather than after the model has loaded, and uvicorn later listens
    on this very socket. SystemExit with one line where it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses a TIME_WAIT port
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise SystemExit(_bind_error(host, port, exc)) from None
    return sock


def _bind_error(host: str, port: int, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    hint = " (another server is running there; stop it or pass another --port)" \
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE else ""
    return f"kvflow: error: cannot listen on {_address(host, port)}: {reason}{hint}"


def _first_lines(exc: BaseException) -> str:
    """An engine's start failure in one line: its message up to the traceback an engine core sends along."""
    lines = []
    for line in str(exc).splitlines():
        if line.startswith("Traceback (most recent call last)"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(exc).__name__


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    if args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    with contextlib.closing(bind_socket(args.host, args.port)) as sock:
        return _serve(args, sock)


def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    import uvicorn

    from kvflow.config import EngineConfig
    from kvflow.model.loader import load_tokenizer
    from kvflow.server.app import build_app
    from kvflow.server.async_engine import AsyncEngine
    from kvflow.server.metrics import ServerMetrics
    from kvflow.server.serving import ServerContext

    model = model_path(args)
    config = EngineConfig.create(model, dtype=args.dtype, max_model_len=args.max_model_len, device=args.device,
                                 seed=args.seed, **engine_kwargs(args))
    if args.step_log:
        config = dataclasses.replace(config, step_log=str(Path(args.step_log).resolve()))
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    name = args.served_model_name or args.model or Path(model).name  # the shipped model is "tiny"
    metrics = ServerMetrics(name, config.scheduler.max_num_batched_tokens)  # the step-size buckets end there
    if args.allow_runtime_lora and not (args.api_key and config.lora.enable_lora):
        raise ValueError("--allow-runtime-lora needs --api-key (loading adapters changes what every client is "
                         "served) and --enable-lora")
    if args.disagg or args.deployment or args.ray_address:
        if config.lora.enable_lora:
            raise ValueError("--enable-lora is not supported with disaggregated serving yet (each prefill "
                             "instance would need the adapters too): serve adapters from one engine")
        from kvflow.disagg.router import DisaggEngine

        transfer = KVTransferConfig(transport=args.kv_transport, mode=args.kv_transfer_mode,
                                    timeout_s=args.kv_transfer_timeout, host=args.kv_host)
        engine = DisaggEngine(config, tokenizer, metrics, args.max_waiting_requests, _deployment(args), transfer,
                              args.pin_cores, args.ray_address, args.ray_placement_timeout)
    else:
        engine = AsyncEngine(config, tokenizer, metrics, args.max_waiting_requests)
    ctx = ServerContext(engine, tokenizer, name, config.model.max_model_len)
    app = build_app(ctx, api_key=args.api_key, max_body_bytes=args.max_request_bytes,
                    allow_runtime_lora=args.allow_runtime_lora)
    server = _engine_first_server(app, uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=5, lifespan="off",
    ))
    _after_uvicorn_signals(server)
    try:
        server.run(sockets=[sock])
    except Exception as exc:
        if not server.started and isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            print(_bind_error(args.host, args.port, exc), file=sys.stderr)  # taken between our bind and listen
            return 1
        if server.engine_ready:
            raise  # a crash while serving: its traceback
        logger.debug("the engine failed to start", exc_info=True)  # --log-level debug: the whole story
        print(f"kvflow: error: {_first_lines(exc)}", file=sys.stderr)
        return 1
    gc.freeze()  # skip the interpreter's final full collection: seconds with torch loaded, for nothing
    return 0 if server.started else 1


def _engine_first_server(app: Any, config: Any) -> Any:
    """A uvicorn.Server inside the app's lifespan (uvicorn's own lifespan is off): the engine starts, or fails
    with its own error rather than uvicorn's traceback of the lifespan, before uvicorn takes the signals and
    listens; it stops after uvicorn has drained. `engine_ready`: the lifespan's startup finished. The app's
    lifespan yields no state."""
    import uvicorn

    class EngineFirstServer(uvicorn.Server):
        engine_ready = False

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            async with app.router.lifespan_context(app):
                self.engine_ready = True
                await super().serve(sockets=sockets)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and sockets:  # uvicorn names the address only for sockets it bound itself
                host, port = sockets[0].getsockname()[:2]
                logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)",
                                                        _address(host, port))

    return EngineFirstServer(config)


def _after_uvicorn_signals(server: Any) -> None:
    """uvicorn re-raises the signal it shut down for; by then shutdown is complete, so exit 0."""

    def handler(signum: int, _frame: Any) -> None:
        if not server.should_exit:  # arrived before uvicorn took over: stop now
            raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def configure(serve: argparse.ArgumentParser) -> None:
    add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=run_serve)
