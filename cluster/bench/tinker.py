"""`lorafleet bench tinker`: the Tinker API (`lorafleet serve`, driven by the official `tinker`
SDK) against the same work done by the fleet's own actors, measured in one command on one fleet
(cluster/tinker/server.py's start_fleet).

1. Per call: forward_backward (B addition datums, cross_entropy), optim_step and sample (one
   prompt, n samples, <= m tokens) in turn, timed in rounds: in-process (a client adapter added
   on the learner, the learner actor's and one rollout worker's methods called with Ray), then
   through the API (a client process's training client and the sampling client of its untrained
   weights, as the in-process sampler's). Taking turns, a load that comes and goes on a shared
   machine slows both sides alike. Each call's latency is the median and p90 over all rounds
   (after each round's warm-up); API / in-process is the API's overhead.
2. Scaling: P clients at once (threads of a client process, each its own ServiceClient,
   training client and sampler), each K iterations of (sample a group of n, forward_backward,
   optim_step): iterations/s and samples/s of them all, against the first P.

The SDK runs in its own Python process (`python -m lorafleet.cluster.bench.tinker SPEC.json`),
as a user's script does: the server's HTTP loop and the clients do not share one GIL. Nothing
here is asserted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .harness import markdown_table, provenance, publish, ratio, report

CALLS = ("forward_backward", "optim_step", "sample")
IN_PROCESS = "bench-in-process"  # the baseline's adapter on the learner and slot on the worker
SAMPLE_PROMPT = "12+7="
LEARNING_RATE = 1e-4
SERVER_START_S = 600  # the client process gives up on a server that never listens


@dataclass(frozen=True)
class Workload:
    """What every call does and how often; `rows`: the B addition datums as token lists
    (tokens, next-token targets, loss weights), `prompt`: the sampled prompt's tokens."""

    datums: int = 8
    samples: int = 8
    max_tokens: int = 16
    calls: int = 30  # timed calls of each kind and side, over all rounds
    rounds: int = 3
    warmup: int = 5  # calls of each kind and side before each round's timed ones
    clients: list[int] = field(default_factory=lambda: [1, 2, 4])
    iterations: int = 20
    rank: int = 8
    seed: int = 0
    rows: list[dict] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)


# -- figures ------------------------------------------------------------------------------------
def latency_ms(seconds: list[float]) -> dict[str, float]:
    """Median and 90th percentile (inclusive: within the values measured), in milliseconds."""
    p90 = statistics.quantiles(seconds, n=10, method="inclusive")[8] if len(seconds) > 1 \
        else seconds[0]
    return {"median_ms": statistics.median(seconds) * 1000, "p90_ms": p90 * 1000}


def timed(calls: dict[str, Callable[[], object]], count: int, warmup: int
          ) -> dict[str, list[float]]:
    """Each call's seconds, the calls made in turn `warmup + count` times; the warm-up rounds'
    left out."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + count):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def medians_line(seconds: dict[str, list[float]]) -> str:
    return "  median " + ", ".join(f"{name} {statistics.median(s) * 1000:.1f} ms"
                                   for name, s in seconds.items())


def rates(clients: int, iterations: int, samples: int, seconds: float) -> dict[str, float]:
    return {"clients": clients, "seconds": seconds,
            "iterations_per_s": clients * iterations / seconds,
            "samples_per_s": clients * iterations * samples / seconds}


def addition_rows(tokenizer, count: int) -> list[dict]:
    """`count` sums "a+b=" with their answer and EOS, as next-token datums weighted on the
    answer."""
    rows = []
    for k in range(count):
        a, b = k % 7 + 1, k // 7 + 2
        prompt = tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(a + b), add_special_tokens=False)["input_ids"] + \
            [tokenizer.eos_token_id]
        full = prompt + answer
        rows.append({"tokens": full[:-1], "targets": full[1:],
                     "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer)})
    return rows


# -- the server's side: the fleet, in-process and over HTTP -------------------------------------
@contextmanager
def in_process_calls(service, work: Workload
                     ) -> Iterator[tuple[dict[str, Callable[[], object]], list]]:
    """The calls on the actors directly, and the list the last sample call's rollouts land in;
    the adapter is added for the block and removed after it. The worker samples the adapter's
    untrained weights throughout, as the API's sampler does."""
    import ray
    import torch

    from ...common.client_records import AdamStep, ClientLoss, TokenDatum
    from ...common.records import GenerationRequest, Prompt

    learner, worker = service.learner, service.rollout.actors[0]
    lora = service.client_lora({"rank": work.rank, "train_unembed": False})[0]
    ray.get(learner.add_client_policy.remote(IN_PROCESS, lora, work.seed))
    try:
        ray.get(worker.load_snapshot.remote(learner.publish.remote(IN_PROCESS), IN_PROCESS))
        request = GenerationRequest(IN_PROCESS, [Prompt(0, "", work.prompt, {})], work.samples,
                                    1.0, work.max_tokens, work.seed)
        datums = [TokenDatum(row["tokens"], {
            "target_tokens": torch.tensor(row["targets"], dtype=torch.int64),
            "weights": torch.tensor(row["weights"], dtype=torch.float32)}) for row in work.rows]
        loss, step = ClientLoss("cross_entropy"), AdamStep(learning_rate=LEARNING_RATE)
        drawn = []

        def sample() -> None:
            drawn[:] = ray.get(worker.generate_requests.remote([request]))[0]

        yield {
            "forward_backward": lambda: ray.get(learner.forward_backward.remote(
                [(IN_PROCESS, datums, loss, False)])),
            "optim_step": lambda: ray.get(learner.optim_step.remote([(IN_PROCESS, step)])),
            "sample": sample,
        }, drawn
    finally:
        ray.get(worker.drop_slot.remote(IN_PROCESS))
        ray.get(learner.remove_policy.remote(IN_PROCESS))


class ServedBench:
    """The service answers HTTP in the main thread (server.py's serve_http) while a driver
    thread takes the rounds and runs the client processes; once they are done it stops the
    server as `lorafleet serve` is stopped, by SIGINT."""

    def __init__(self, service, work: Workload, out: Path, address_file: Path) -> None:
        self.service, self.work, self.out, self.address_file = service, work, out, address_file
        self.serving = threading.Event()
        self.client: subprocess.Popen | None = None
        self.figures: dict = {}
        self.failure: list[BaseException] = []

    def run(self) -> dict:
        from ..tinker.server import serve_http

        self.address_file.parent.mkdir(parents=True, exist_ok=True)
        self.address_file.unlink(missing_ok=True)
        self.serving.set()
        driver = threading.Thread(target=self.drive, name="tinker-bench", daemon=True)
        driver.start()
        try:
            asyncio.run(serve_http(self.service, frozenset(), self.address_file))
        except KeyboardInterrupt:
            pass
        finally:
            self.serving.clear()
            if self.client is not None and self.client.poll() is None:
                self.client.terminate()
        driver.join()
        if self.failure:
            raise self.failure[0]
        return self.figures

    def drive(self) -> None:
        try:
            server_url(self.address_file, self.serving.is_set)
            self.figures = self.rounds()
            self.figures["scaling"] = self.client_process("scaling")
        except BaseException as exc:  # the main thread raises it once the server has stopped
            self.failure.append(exc)
        finally:
            if self.serving.is_set():
                os.kill(os.getpid(), signal.SIGINT)

    def rounds(self) -> dict:
        work, per_round = self.work, max(1, self.work.calls // self.work.rounds)
        seconds: dict[str, dict[str, list[float]]] = {
            side: {name: [] for name in CALLS} for side in ("api", "in_process")}
        with in_process_calls(self.service, work) as (calls, drawn):
            for round_ in range(1, work.rounds + 1):
                print(f"bench tinker: round {round_}/{work.rounds}: {work.warmup} + {per_round} "
                      "calls of each kind in-process, then through the API", flush=True)
                ours = timed(calls, per_round, work.warmup)
                print(medians_line(ours), flush=True)
                theirs = self.client_process("latency", per_round)
                for name in CALLS:
                    seconds["in_process"][name] += ours[name]
                    seconds["api"][name] += theirs["seconds"][name]
        return {"seconds": seconds, "sample_tokens": {
            "api": theirs["sample_tokens"], "in_process": sum(len(r.response_ids) for r in drawn)}}

    def client_process(self, mode: str, calls: int = 0):
        """The SDK's side of `mode` (latency: `calls` timed calls; scaling) in a client
        process; its figures."""
        spec = self.out / "tinker_client_spec.json"
        result = self.out / "tinker_client_result.json"
        result.unlink(missing_ok=True)
        spec.write_text(json.dumps({
            "address_file": str(self.address_file), "model": self.service.model_name,
            "work": asdict(self.work), "mode": mode, "calls": calls, "result": str(result)}))
        self.client = subprocess.Popen([sys.executable, "-m", __name__, str(spec)])
        if self.client.wait() != 0:
            raise RuntimeError(f"the benchmark's client process ({mode}) failed "
                               f"(exit {self.client.returncode})")
        return json.loads(result.read_text())


def server_url(address_file: Path, waiting: Callable[[], bool] = lambda: True) -> str:
    """The base URL the server writes to `address_file` once it listens."""
    deadline = time.monotonic() + SERVER_START_S
    while not address_file.is_file():
        if time.monotonic() > deadline or not waiting():
            raise RuntimeError(f"no Tinker server wrote {address_file}")
        time.sleep(0.2)
    return json.loads(address_file.read_text())["base_url"]


# -- the client process (the SDK) ---------------------------------------------------------------
def sdk_datums(work: Workload) -> list:
    import numpy as np
    from tinker import types

    return [types.Datum(model_input=types.ModelInput.from_ints(row["tokens"]), loss_fn_inputs={
        "target_tokens": np.array(row["targets"], dtype=np.int64),
        "weights": np.array(row["weights"], dtype=np.float32)}) for row in work.rows]


def sdk_client(url: str, model: str, work: Workload):
    """A ServiceClient, its training client (rank, seed and targets as in-process) and the
    sampling client of its current weights."""
    import tinker

    client = tinker.ServiceClient(base_url=url)
    training = client.create_lora_training_client(base_model=model, rank=work.rank,
                                                  seed=work.seed, train_unembed=False)
    return client, training, training.save_weights_and_get_sampling_client()


def sdk_latency(url: str, model: str, work: Workload, calls: int
                ) -> tuple[dict[str, list[float]], int]:
    """The calls' seconds through the API, and the tokens the last sample call drew."""
    from tinker import types

    client, training, sampler = sdk_client(url, model, work)
    with client:
        prompt = types.ModelInput.from_ints(work.prompt)
        params = types.SamplingParams(max_tokens=work.max_tokens, temperature=1.0,
                                      seed=work.seed)
        datums, adam = sdk_datums(work), types.AdamParams(learning_rate=LEARNING_RATE)
        drawn = []

        def sample() -> None:
            drawn[:] = sampler.sample(prompt, work.samples, params).result().sequences

        seconds = timed({
            "forward_backward": lambda: training.forward_backward(
                datums, "cross_entropy").result(),
            "optim_step": lambda: training.optim_step(adam).result(),
            "sample": sample,
        }, calls, work.warmup)
    return seconds, sum(len(s.tokens) for s in drawn)


def sdk_clients_at_once(url: str, model: str, work: Workload, clients: int) -> dict[str, float]:
    """`clients` threads, each its own client running `work.iterations` iterations (after one
    warm-up) from a common start; the rates of them all."""
    from tinker import types

    start = threading.Barrier(clients)
    spans, failures = [], []

    def one(index: int) -> None:
        try:
            client, training, sampler = sdk_client(url, model, work)
            with client:
                prompt = types.ModelInput.from_ints(work.prompt)
                datums, adam = sdk_datums(work), types.AdamParams(learning_rate=LEARNING_RATE)

                def iteration(i: int) -> None:
                    sampler.sample(prompt, work.samples, types.SamplingParams(
                        max_tokens=work.max_tokens, temperature=1.0,
                        seed=work.seed + 1000 * index + i)).result()
                    backward = training.forward_backward(datums, "cross_entropy")
                    step = training.optim_step(adam)
                    backward.result()
                    step.result()

                iteration(-1)
                start.wait()
                began = time.perf_counter()
                for i in range(work.iterations):
                    iteration(i)
                spans.append((began, time.perf_counter()))
        except BaseException as exc:
            failures.append(exc)
            start.abort()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    seconds = max(end for _, end in spans) - min(began for began, _ in spans)
    return rates(clients, work.iterations, work.samples, seconds)


def client_main(spec: dict) -> None:
    os.environ.setdefault("TINKER_API_KEY", "tml-lorafleet-bench")  # the SDK's key format
    url, model = server_url(Path(spec["address_file"])), spec["model"]
    work = Workload(**spec["work"])
    if spec["mode"] == "latency":
        seconds, tokens = sdk_latency(url, model, work, spec["calls"])
        print(medians_line(seconds).replace("median", "API median"), flush=True)
        result = {"seconds": seconds, "sample_tokens": tokens}
    else:
        result = []
        for clients in work.clients:
            print(f"bench tinker: {clients} client(s) at once, {work.iterations} iterations "
                  "each", flush=True)
            result.append(sdk_clients_at_once(url, model, work, clients))
            print(f"  {result[-1]['iterations_per_s']:.2f} iterations/s", flush=True)
    Path(spec["result"]).write_text(json.dumps(result))


# -- the command --------------------------------------------------------------------------------
def tables(results: dict) -> str:
    work = results["workload"]
    latency = results["latency"]
    rows = []
    for name in CALLS:
        api, base = latency[name]["api"], latency[name]["in_process"]
        rows.append([name, f"{api['median_ms']:.1f}", f"{api['p90_ms']:.1f}",
                     f"{base['median_ms']:.1f}", f"{base['p90_ms']:.1f}",
                     ratio(api["median_ms"], base["median_ms"])])
    per_call = markdown_table(["call", "API median ms", "API p90 ms", "in-process median ms",
                               "in-process p90 ms", "API / in-process (median)"], rows)
    scaling = results["scaling"]
    first = scaling[0]
    at_once = markdown_table(
        ["clients at once", "iterations/s", "samples/s", f"vs {first['clients']} client(s)"],
        [[str(s["clients"]), f"{s['iterations_per_s']:.2f}", f"{s['samples_per_s']:.1f}",
          ratio(s["iterations_per_s"], first["iterations_per_s"])] for s in scaling])
    tokens = results["sample_tokens"]
    return (f"per call ({results['calls']} calls of each, in {work['rounds']} rounds taking "
            f"turns with the other side, each after {work['warmup']} warm-up; forward_backward: "
            f"{work['datums']} addition datums, cross_entropy; sample: one prompt, "
            f"{work['samples']} samples x <= {work['max_tokens']} tokens, drawing "
            f"{tokens['api']} tokens through the API, {tokens['in_process']} in-process; "
            f"LoRA rank {work['rank']})\n\n{per_call}\n"
            f"clients at once (each {work['iterations']} iterations of sample, forward_backward,"
            f" optim_step after one warm-up)\n\n{at_once}")


def bench_tinker(path: str | None, overrides: list[str], out: str, clients: list[int] | None,
                 calls: int | None, iterations: int | None, command: str) -> dict:
    """Runs the benchmark into `out` (None: Workload's default) and returns its figures."""
    from ...common.tasks.registry import build_task
    from ..inputs import driver_tokenizer, resolve_model
    from ..specs import rollout_workers
    from ..tinker.config import load_serve_config
    from ..tinker.server import start_fleet

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_serve_config(path, [f"run_dir={out_dir / 'serve'}", "serve.port=0",
                                   *overrides])
    run = cfg.train_config()
    tokenizer = driver_tokenizer(run, resolve_model(run, build_task(cfg.task)))
    given = {"clients": clients, "calls": calls, "iterations": iterations}
    work = Workload(seed=cfg.seed, rows=addition_rows(tokenizer, Workload.datums),
                    prompt=tokenizer(SAMPLE_PROMPT)["input_ids"],
                    **{key: value for key, value in given.items() if value is not None})
    with ExitStack() as stack:
        workers = rollout_workers(cfg.train_config())
        print(f"bench tinker: starting the fleet ({workers} rollout workers)", flush=True)
        service = start_fleet(cfg, stack)
        figures = ServedBench(service, work, out_dir, Path(cfg.run_dir) / "server.json").run()
    seconds = figures["seconds"]
    results = {
        "provenance": provenance(command),
        "workload": {k: v for k, v in asdict(work).items() if k not in ("rows", "prompt")},
        "latency": {name: {side: latency_ms(seconds[side][name])
                           for side in ("api", "in_process")} for name in CALLS},
        "calls": len(seconds["api"]["sample"]),
        "sample_tokens": figures["sample_tokens"],
        "scaling": figures["scaling"],
    }
    (out_dir / "tinker_bench.json").write_text(json.dumps(results, indent=1))
    publish(report(command, f"Tinker API benchmark (model {cfg.model.name_or_path}, "
                   f"{workers} rollout workers)", tables(results)),
            out_dir / "tinker_bench.md", ("tinker_bench.json",))
    return results


if __name__ == "__main__":
    client_main(json.loads(Path(sys.argv[1]).read_text()))
