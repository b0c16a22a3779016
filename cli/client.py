"""The CLI's HTTP client for the API, and the --api-url / --api-key options every API command takes.

Users never need Redis or S3 credentials: only the API URL and their API key
(HOTSWAP_API_URL / HOTSWAP_API_KEY, or --api-url / --api-key).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.console import fail

ApiUrl = Annotated[Optional[str], typer.Option("--api-url", help="API base URL (default: HOTSWAP_API_URL or http://127.0.0.1:8000).")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", help="Your API key (default: HOTSWAP_API_KEY).")]


class Api:
    """A thin httpx client that turns every failure into one readable line."""

    def __init__(self, api_url: str | None, api_key: str | None):
        import httpx

        from hotswap.settings import get_settings

        settings = get_settings()
        self.base = (api_url or settings.api_url).rstrip("/")
        key = api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
        if not key:
            fail("no API key: pass --api-key or set HOTSWAP_API_KEY (an admin creates one with `hotswap keys create`)")
        self.client = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=600)

    def call(self, method: str, path: str, **kw) -> dict:
        import httpx

        try:
            response = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the API at {self.base}: {exc}")
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text[:300]
            fail(f"{message} (HTTP {response.status_code})")
        try:
            return response.json()
        except ValueError:
            fail(f"the API at {self.base} answered {path} with something other than JSON: is that the hotswap API?")
