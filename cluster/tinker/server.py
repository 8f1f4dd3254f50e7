"""`lorafleet serve`: on the warm fleet `lorafleet up --serve` keeps, or on a fleet of its own
(Ray joined or a local cluster started, the learner and the rollout workers placed and
started), answer the Tinker API over HTTP until interrupted. The address it listens on is
printed and written to RUN/server.json (with serve.port=0 the OS picks a port)."""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from ...common.configio import save_config
from ...common.data import pad_token_id
from ...common.records import POLICY
from ...common.specs import EngineSpec, LearnerSpec
from ...common.tasks.registry import build_task
from .. import warm
from ..actor_group import place
from ..config import TrainConfig
from ..fleet import fixed_cluster, start_engines_and_learner
from ..inputs import driver_tokenizer, resolve_model
from ..specs import engine_spec, group_specs, learner_spec, sync_tolerance
from ..telemetry import ServeMetrics
from .app import build_app
from .config import ATTENTION_MODULES, MLP_MODULES, ServeConfig
from .service import TinkerService

# the prompts every sampler's load is verified with (any tokenizer encodes them)
PROBE_TEXTS = ("12+34=", "7+8=")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_keys(cfg: ServeConfig) -> frozenset[str]:
    keys = frozenset(k.strip() for k in os.environ.get(cfg.serve.api_keys_env, "").split(",")
                     if k.strip())
    bad = sorted(k[:8] + "..." for k in keys if not k.startswith("tml-"))
    if bad:
        raise ValueError(f"${cfg.serve.api_keys_env}: the tinker SDK sends only keys that "
                         f"start with tml-; not {bad}")
    return keys


def serve_specs(cfg: ServeConfig) -> tuple[TrainConfig, object, LearnerSpec, EngineSpec]:
    """The run config, the tokenizer, and the learner's and rollout engines' specs of the
    fleet a server of `cfg` runs on (its own, or the one `lorafleet up --serve` keeps warm):
    one base model on the learner, the clients' adapters added at runtime; rollout.max_loras
    adapters per engine, on every module a client may train."""
    run = cfg.train_config()
    model_path = resolve_model(run, build_task(cfg.task))
    tokenizer = driver_tokenizer(run, model_path)
    # the learner's own policy anchors the adapters on the base model; it is never served
    learner = replace(learner_spec(run, model_path, pad_token_id(tokenizer), [(POLICY, run)]),
                      stages=())
    engine = replace(engine_spec(run, model_path), max_loras=cfg.rollout.max_loras,
                     lora_target_modules=ATTENTION_MODULES + MLP_MODULES)
    return run, tokenizer, learner, engine


def start_fleet(cfg: ServeConfig, stack: ExitStack) -> TinkerService:
    """The learner and the rollout workers: the warm fleet's if one is up for this server
    (cluster/warm.py), else placed together and started here; returns once all are up."""
    import ray

    run, tokenizer, learner_args, engine = serve_specs(cfg)
    groups = group_specs(run)[:2]  # the learner's and the rollout workers'
    lease = warm.join_or_connect(run, stack)
    if lease is not None:
        learner, rollout = lease.lend(groups, learner_args, engine, None)
    else:
        placement = place(groups, cfg.placement.strategy, cfg.placement.timeout_s,
                          fixed_cluster(run))
        stack.callback(placement.remove)
        learner, rollout = start_engines_and_learner(groups, placement, learner_args, engine,
                                                     None)
    stack.callback(learner.kill)  # a lent group's actors stay up for their warm fleet
    stack.callback(rollout.kill)
    ray.get(learner.ready() + rollout.ready())
    probe_ids = [tokenizer(text)["input_ids"] for text in PROBE_TEXTS]
    return TinkerService(cfg, engine.model_path, engine.model_path, learner.actors[0], rollout,
                         probe_ids, sync_tolerance(run))


async def report(service: TinkerService, every_s: float = 5.0) -> None:
    """The service's figures on the Ray dashboard, refreshed every few seconds."""
    status = service.status()
    metrics = ServeMetrics(Path(service.cfg.run_dir).name, list(status))
    while True:
        metrics.update(service.status())
        await asyncio.sleep(every_s)


async def serve_http(service: TinkerService, keys: frozenset[str], address_file: Path) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(
        build_app(service, keys), host=service.serve.host, port=service.serve.port,
        log_level="warning", timeout_keep_alive=75))
    loops = asyncio.ensure_future(asyncio.gather(service.run(), report(service)))
    # an interrupt cancels the loops: their CancelledError is the expected end, not news
    loops.add_done_callback(lambda done: done.cancelled() or done.exception())
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        if serving.done() or loops.done():
            break
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        url = f"http://{host}:{port}"
        address_file.write_text(json.dumps({"base_url": url, "model": service.model_name}))
        print(f"lorafleet serve: {service.model_name} at {url}  (TINKER_BASE_URL={url})",
              flush=True)
    done, _ = await asyncio.wait([serving, loops], return_when=asyncio.FIRST_COMPLETED)
    loops.cancel()
    server.should_exit = True
    for task in done:
        task.result()  # a loop's crash ends the server with its error


def serve(cfg: ServeConfig) -> None:
    keys = api_keys(cfg)
    if cfg.serve.host not in LOOPBACK and not keys:
        print(f"warning: serving {cfg.serve.host} with no API keys: anyone who reaches the port"
              f" can train and sample; set ${cfg.serve.api_keys_env}", flush=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    with ExitStack() as stack:
        service = start_fleet(cfg, stack)
        try:
            asyncio.run(serve_http(service, keys, run_dir / "server.json"))
        except KeyboardInterrupt:
            pass
        finally:
            (run_dir / "server.json").unlink(missing_ok=True)
