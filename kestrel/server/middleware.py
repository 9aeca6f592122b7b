"""ASGI middleware of the API process: body size limit, admission while draining, call counting.

`BodyLimitMiddleware` answers 413 to a body larger than `--max-request-body-mb`: at once from its
Content-Length (the body is never read; the connection is closed), or, for a chunked body, as soon
as the bytes received pass the limit. `AdmissionMiddleware` stamps each request's arrival time,
counts the generating calls (POST) until their response is fully sent, so a drain knows when it
is done, and answers 503 + Retry-After to new ones while the server drains. No torch here.
"""

from __future__ import annotations

import time

from kestrel.server.errors import APIError
from kestrel.server.serving import RETRY_AFTER, ServerState


class BodyTooLarge(APIError):
    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"The request body is larger than the server's limit of {limit_bytes / 2**20:g} MB "
                         "(--max-request-body-mb).", 413, code="request_too_large",
                         headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, BodyTooLarge(self.max_bytes))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # answered by the APIError handler
            return message

        await self.app(scope, limited_receive, send)


class AdmissionMiddleware:
    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        scope["kestrel.arrival"] = time.monotonic()
        state = self.state
        if state.draining:
            return await _send_error(send, APIError("The server is shutting down; retry on another instance "
                                                    "or later.", 503, code="shutting_down",
                                                    headers={**RETRY_AFTER, "Connection": "close"}))
        state.num_active_calls += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.num_active_calls -= 1


async def _send_error(send, error: APIError) -> None:
    response = error.to_response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
