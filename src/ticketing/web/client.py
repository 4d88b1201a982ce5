"""Calls to the services' HTTP APIs on behalf of the visitor, with the visitor's cookie."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from ticketing.common.auth import COOKIE_NAME


@dataclass
class ApiResult:
    status: int
    body: Any
    set_cookies: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def errors(self) -> dict[str | None, str]:
        """The contract's error list as {field: message}; None keys a form-wide message."""
        if not isinstance(self.body, dict):
            return {None: "Something went wrong; please try again."}
        found: dict[str | None, str] = {}
        for item in self.body.get("errors", []):
            found.setdefault(item.get("field"), item.get("message", "Invalid value"))
        return found


class ApiUnavailable(Exception):
    pass


class Api:
    """One visitor's view of the APIs: every call carries their session cookie."""

    def __init__(
        self, http: httpx.AsyncClient, session_cookie: str | None, client_ip: str | None = None
    ) -> None:
        self.http = http
        self.cookies = {COOKIE_NAME: session_cookie} if session_cookie else {}
        self.client_ip = client_ip

    async def call(self, method: str, path: str, json: Any = None) -> ApiResult:
        try:
            response = await self.http.request(method, path, json=json, headers=self._headers())
        except httpx.HTTPError as exc:
            raise ApiUnavailable(str(exc)) from exc
        try:
            body = response.json() if response.content else None
        except ValueError as exc:  # not the API answering (a proxy's error page, say)
            raise ApiUnavailable(f"{method} {path}: {response.status_code}, not JSON") from exc
        return ApiResult(response.status_code, body, response.headers.get_list("set-cookie"))

    def _headers(self) -> dict[str, str]:
        headers = {}
        if self.cookies:
            headers["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if self.client_ip:
            # The visitor's address, so that per-client rate limits count visitors, not us.
            headers["x-forwarded-for"] = self.client_ip
        return headers
