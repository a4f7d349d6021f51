"""diffserve's OpenAI-compatible app on Ray Serve: replicas placed by Ray across the machines of a Ray
cluster, autoscaled on their queue depth.

Each Ray replica runs exactly what `diffserve serve` runs (server.launch.build_server: the same
engine, scheduler, batching, limits and errors) on the devices of its own placement group: one bundle
of `replica world size` GPUs (tp x ulysses x ring x cfg; none with --device cpu), so a replica's
worker processes share one machine. Ray adds the HTTP proxy that spreads requests over the replicas,
restarts a replica whose health check fails (the engine failed for good; a crashed worker group is
restarted inside the replica first, as under `diffserve serve`), and autoscaling: with
--max-replicas, Ray keeps about --target-ongoing-requests requests (queued in a replica's scheduler
or running there) per replica.

    python -m diffserve.integrations.ray_serve MODEL --num-replicas 2 [serve and engine flags]
    serve run diffserve.integrations.ray_serve:app_builder model=MODEL num-replicas=2 [flag=value ...]

The first starts a local Ray instance (or joins RAY_ADDRESS / --address) and serves until Ctrl-C; the
second is Ray's own CLI with the same flags as key=value pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # an optional extra: say which
    raise ImportError("diffserve.integrations.ray_serve needs Ray Serve: pip install 'diffserve[ray]'") from exc

from diffserve.config import OmniDiffusionConfig
from diffserve.entrypoints.cli import ENGINE_SWITCHES, add_engine_args, add_server_args, engine_kwargs, server_config
from diffserve.server.state import ServerConfig

logger = logging.getLogger(__name__)

__all__ = ["DiffServeReplica", "app_builder", "build_application", "main"]

DEFAULT_APP_NAME = "diffserve"


class DiffServeReplica:
    """One Ray Serve replica: `diffserve serve`'s app (build_server) on the devices Ray gave it."""

    async def __init__(self, model: str, engine_options: dict[str, Any], config: ServerConfig, max_replicas: int):
        from diffserve.logger import configure_logging
        from diffserve.server.launch import build_server

        configure_logging()
        self._app, self._state = build_server(model, engine_options, config)
        engine = self._state.engine
        # Ray sends requests to a replica once its constructor returns: return when the model serves
        # (a load error fails the replica, which Ray reports and retries).
        await asyncio.to_thread(engine.wait_until_all_loaded)
        error = engine.load_exception
        if error is None and engine.spec.modality == "video" and max_replicas > 1:
            # A video job lives in the replica that made it: a later GET could reach another replica.
            error = ValueError("video jobs are kept by the replica that runs them, so a video model runs as one Ray "
                               "Serve replica (--num-replicas 1, its GPUs set by the parallel flags); for several "
                               "replicas behind one job store use `diffserve serve --data-parallel-size N`")
        if error is not None:
            await asyncio.to_thread(engine.shutdown)
            raise error

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Ray replaces a replica whose check raises: only an engine that failed for good. A worker
        group that is restarting ("recovering") comes back by itself."""
        if self._state.status == "failed":
            reason = self._state.engine.load_error or "it could not recover"
            raise RuntimeError(f"the diffserve engine failed: {reason}")


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Serve replicas")
    group.add_argument("--num-replicas", type=int, default=None,
                       help="a fixed number of replicas (default 1; not with --max-replicas)")
    group.add_argument("--min-replicas", type=int, default=None,
                       help="autoscaling: fewest replicas (default 1; needs --max-replicas)")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="autoscaling between --min-replicas and this many replicas, on queue depth")
    group.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="autoscaling: requests per replica (queued in its scheduler or running) Ray aims for; "
                            "default: the max batch size")
    group.add_argument("--max-ongoing-requests", type=int, default=None,
                       help="most requests Ray hands one replica at once (more wait in Ray's router, for any "
                            "replica); default: twice the max batch size")
    group.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves for each replica")


def app_parser(prog: str) -> argparse.ArgumentParser:
    """The flags of one deployed app: `diffserve serve`'s (but where to listen) and the replicas'."""
    from diffserve.entrypoints.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_server_args(parser)
    add_engine_args(parser)
    add_replica_args(parser)
    return parser


def cli_parser() -> argparse.ArgumentParser:
    parser = app_parser("python -m diffserve.integrations.ray_serve")
    group = parser.add_argument_group("Ray")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray instance)")
    group.add_argument("--host", default="127.0.0.1", help="address Ray Serve's HTTP proxy listens on")
    group.add_argument("--port", type=int, default=8000, help="port Ray Serve's HTTP proxy listens on")
    group.add_argument("--name", default=DEFAULT_APP_NAME, help="the Ray Serve application's name")
    return parser


def deployment_options(args: argparse.Namespace, od_config: OmniDiffusionConfig, config: ServerConfig,
                       on_gpus: bool) -> dict:
    """Ray Serve options of the deployment: its placement (one bundle per replica), count or
    autoscaling, how many requests a replica takes at once, and its shutdown grace."""
    for flag, value, least in (("--num-replicas", args.num_replicas, 1), ("--max-replicas", args.max_replicas, 1),
                               ("--max-ongoing-requests", args.max_ongoing_requests, 1),
                               ("--target-ongoing-requests", args.target_ongoing_requests, 1e-9),
                               ("--cpus-per-replica", args.cpus_per_replica, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be {'positive' if least else '>= 0'}, got {value}")
    pc = od_config.parallel_config
    if pc.data_parallel_size > 1:
        raise ValueError("--data-parallel-size is for `diffserve serve`; under Ray Serve, Ray runs the replicas: "
                         "use --num-replicas, or --min-replicas/--max-replicas")
    gpus = pc.replica_world_size if on_gpus else 0
    # A replica's worker processes are spawned by the replica, not by Ray: they see the GPUs Ray gave
    # the replica's actor, so the actor takes all of them, in one bundle (one machine).
    resources = {"CPU": args.cpus_per_replica, **({"GPU": gpus} if gpus else {})}
    batch = od_config.max_batch_size
    options = {
        "ray_actor_options": {"num_cpus": args.cpus_per_replica, "num_gpus": gpus},
        "placement_group_bundles": [resources],
        "placement_group_strategy": "STRICT_PACK",
        "max_ongoing_requests": args.max_ongoing_requests or 2 * batch,
        # Ray stops routing to a replica it stops, then gives its running requests this long.
        "graceful_shutdown_timeout_s": config.shutdown_grace_s,
    }
    if args.max_replicas is None:
        if args.min_replicas is not None or args.target_ongoing_requests is not None:
            raise ValueError("--min-replicas and --target-ongoing-requests configure autoscaling, which needs "
                             "--max-replicas")
        options["num_replicas"] = args.num_replicas or 1
        return options
    if args.num_replicas is not None:
        raise ValueError("give either --num-replicas (a fixed count) or --max-replicas (autoscaling), not both")
    low = 1 if args.min_replicas is None else args.min_replicas
    if not 0 <= low <= args.max_replicas:
        raise ValueError(f"--min-replicas must be between 0 and --max-replicas ({args.max_replicas}), got {low}")
    options["autoscaling_config"] = {
        "min_replicas": low,
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests or batch,
    }
    return options


def build_application(args: argparse.Namespace):
    """The Ray Serve application of parsed app_parser() flags. The flags are checked here, before
    anything is deployed; the model is found by each replica (the paths are the replicas')."""
    options = engine_kwargs(args)
    device = options.get("device", "auto")
    if device.startswith("cuda:"):
        raise ValueError("Ray gives each replica its GPUs; use --device cuda or auto, not a numbered GPU")
    # This process may be a head node without a GPU: check the flags as if on one without; each
    # replica checks the device where it runs. Every device but the CPU means GPUs from Ray.
    od_config = OmniDiffusionConfig.from_kwargs(args.model,
                                                **{**options, "device": "cpu" if device == "cpu" else "auto"})
    config = server_config(args)
    placement = deployment_options(args, od_config, config, on_gpus=device != "cpu")
    deployment = serve.deployment(serve.ingress()(DiffServeReplica), name="DiffServe")
    most = placement.get("autoscaling_config", {}).get("max_replicas", placement.get("num_replicas"))
    return deployment.options(**placement).bind(args.model, options, config, most)


def app_builder(args: dict[str, Any]):
    """For `serve run diffserve.integrations.ray_serve:app_builder model=MODEL key=value ...`: the keys
    are app_parser()'s flags without the dashes (num-replicas=2, max_batch_size=4); a switch takes
    true or false; a flag of several values takes a list (in a config file) or one value."""
    return build_application(app_parser("serve run diffserve.integrations.ray_serve:app_builder")
                             .parse_args(args_to_argv(args)))


def args_to_argv(args: dict[str, Any]) -> list[str]:
    switches = {flag for flag, _, _ in ENGINE_SWITCHES}
    argv: list[str] = []
    for key, value in args.items():
        if key == "model":
            argv.insert(0, str(value))
            continue
        flag = "--" + key.replace("_", "-")
        if flag in switches:
            if str(value).lower() not in ("true", "false"):
                raise ValueError(f"{key} is a switch: true or false, got {value!r}")
            argv += [flag] if str(value).lower() == "true" else []
        else:
            argv += [flag, *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = cli_parser().parse_args(argv)
    try:
        application = build_application(args)
    except ValueError as exc:
        print(f"diffserve: error: {exc}", file=sys.stderr)
        return 2
    import ray

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    # SIGTERM stops the app as Ctrl-C does (Ray drains the replicas within --shutdown-grace).
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.run(application, name=args.name, route_prefix="/")
        print(f"serving {args.model!r} on http://{args.host}:{args.port} through Ray Serve (Ctrl-C stops it)",
              flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(args.name)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
