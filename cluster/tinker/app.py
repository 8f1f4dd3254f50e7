"""The Tinker API's HTTP routes (the paths and shapes the `tinker` 0.38.0 SDK uses) on a
TinkerService. Requests that start work answer a future id at once; the SDK polls
retrieve_future, which holds each poll open up to serve.poll_hold_s. Errors answer the API's
shape (`{"error": ..., "category": ...}`): 400 for a request that cannot be served as sent or
asks for something unsupported (named), 404 for what the server does not hold, 401 for a
missing or wrong API key; never a 5xx, which the SDK would retry for minutes."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .service import NotFound, TinkerService
from .state import CALLER, key_id
from .wire import BadRequest, Unsupported

PROTOBUF = "application/x-protobuf"
# the results the SDK reads only as protobuf
PROTO_RESULTS = ("forward", "forward_backward", "sample")


def error(status: int, message: str, category: str = "user"):
    return JSONResponse({"error": message, "detail": message, "category": category},
                        status_code=status)


async def answer(handler: Callable[[], Awaitable[Any] | Any]):
    """A handler's result as JSON, or its failure as the API's error shape."""
    try:
        result = handler()
        if asyncio.iscoroutine(result):
            result = await result
    except Unsupported as exc:
        return error(400, f"not supported by lorafleet serve: {exc}")
    except (BadRequest, KeyError, TypeError, ValueError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        return error(400, what)
    except NotFound as exc:
        return error(404, str(exc))
    except Exception as exc:  # a server bug: named to the client, traced in the server log
        traceback.print_exc()
        return error(400, f"internal error {type(exc).__name__}: {exc} (the server log has "
                     "the traceback)", "server")
    return result if isinstance(result, Response) else JSONResponse(result)


def try_again(body: dict):
    """Not done within the hold: the SDK polls again at once on a 408."""
    return JSONResponse({"type": "try_again", "request_id": str(body.get("request_id")),
                         "queue_state": "active"}, status_code=408)


def build_app(service: TinkerService, api_keys: frozenset[str] = frozenset()):
    app = FastAPI(title="lorafleet serve (Tinker API)")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        key = request.headers.get("X-API-Key")
        if api_keys and request.url.path != "/api/v1/healthz" and key not in api_keys:
            return error(401, "missing or unknown API key (X-API-Key; TINKER_API_KEY on the "
                         "client)")
        CALLER.set(key_id(key) if api_keys else "")
        return await call_next(request)

    def future(request_id: str, **extra) -> dict:
        return {"request_id": request_id, **extra}

    @app.post("/api/v1/client/config")
    async def client_config():
        return {"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": True,
                "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False, "sample_join_sampling_session": False}

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config():
        return {"sample_cancel_enabled": False}

    @app.get("/api/v1/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities():
        return {"supported_models": [{
            "model_name": service.model_name, "trainable": True, "sampleable": True,
            "max_context_length": service.cfg.model.max_model_len}]}

    @app.post("/api/v1/telemetry")
    async def telemetry():
        return {"status": "accepted"}

    @app.post("/api/v1/create_session")
    async def create_session():
        return await answer(lambda: {"type": "create_session",
                                     "session_id": service.create_session()})

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        body = await request.json()
        return await answer(lambda: service.session(body["session_id"]) and
                            {"type": "session_heartbeat"})

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str):
        def close() -> dict:
            service.session(session_id)  # the caller's own
            service.close_session(session_id, "finished by its client")
            return {}

        return await answer(close)

    @app.post("/api/v1/create_model")
    async def create_model(request: Request):
        body = await request.json()
        return await answer(lambda: future(service.create_model(body)))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        body = await request.json()
        return await answer(lambda: service.info(body["model_id"]))

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        body = await request.body()
        encoding = request.headers.get("content-encoding")

        def start():
            request_id, model_id = service.forward_backward(body, encoding)
            return future(request_id, model_id=model_id)

        return await answer(start)

    def json_route(path: str, method: Callable[[dict], str]) -> None:
        async def route(request: Request):
            body = await request.json()
            return await answer(lambda: future(method(body)))

        app.post(path)(route)

    json_route("/api/v1/optim_step", service.optim_step)
    json_route("/api/v1/save_weights", service.save_state)
    json_route("/api/v1/load_weights", service.load_state)
    json_route("/api/v1/save_weights_for_sampler", service.save_for_sampler)

    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        body = await request.json()
        return await answer(lambda: {"type": "create_sampling_session",
                                     "sampling_session_id": service.create_sampler(body)})

    @app.get("/api/v1/samplers/{sampler_id:path}")
    async def get_sampler(sampler_id: str):
        def describe():
            sampler = service.sampler(sampler_id)
            return {"sampler_id": sampler.id, "base_model": sampler.base_model,
                    "model_path": sampler.path}

        return await answer(describe)

    @app.post("/api/v1/asample")
    async def asample(request: Request):
        body = await request.json()

        def start():
            request_id, sequence_ids = service.sample(body)
            return future(request_id, sample_sequence_ids=sequence_ids)

        return await answer(start)

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        body = await request.json()
        entry = service.futures.items.get(str(body.get("request_id")))
        if entry is None:
            return error(404, f"no request {body.get('request_id')!r} on this server (or its "
                         "result expired)")
        try:
            await asyncio.wait_for(entry.done.wait(), service.serve.poll_hold_s)
        except asyncio.TimeoutError:
            return try_again(body)
        if entry.error is not None:
            return {"error": entry.error, "category": entry.category}
        if isinstance(entry.result, bytes):
            return Response(entry.result, media_type=PROTOBUF)
        return entry.result

    @app.get("/api/v1/lorafleet/status")
    async def status():
        return service.status()

    @app.api_route("/api/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unsupported(rest: str):
        return error(404, f"not supported by lorafleet serve: /api/v1/{rest} (the endpoints it "
                     "serves are listed in docs/tinker.md)")

    return app
