"""The HTTP side the remote engines share (the reference server's client, a running ComfyUI's): one httpx client
per run, a refused or dropped connection tried again twice a second apart, every failure an engine error that
names the URL and what to check."""

from __future__ import annotations

import time

RETRIES = 2  # a refused or dropped connection: tried again twice, a second apart
CALL_SECONDS = 30.0  # one HTTP call (a render's wait is the engine's own timeout, polled)


class HttpClient:
    """`_call(method, path, ...)` on `url`; failures raise `error` with `name` (e.g. "server", "ComfyUI")."""

    def __init__(self, url: str, timeout: float, transport, error: type[Exception], name: str):
        import httpx

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = httpx.Client(base_url=self.url, timeout=CALL_SECONDS, transport=transport)
        self._error, self._name = error, name

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw):
        import httpx

        for attempt in range(RETRIES + 1):
            try:
                return self.http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if attempt == RETRIES:
                    raise self._error(f"{self._name} {self.url} cannot be reached ({exc.__class__.__name__}: {exc}); "
                                      f"is it running? (tried {RETRIES + 1} times)") from None
                time.sleep(1.0)
            except httpx.TimeoutException as exc:
                raise self._error(f"{self._name} {self.url} did not answer {method} {path} in {CALL_SECONDS:g} s "
                                  f"({exc.__class__.__name__})") from None
