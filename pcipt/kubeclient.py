"""A small asyncio client for the Kubernetes API, over aiohttp: get, list, create, patch
(merge, JSON and server-side apply), delete, with typed errors for the status codes the
components act on (409 conflict, 404 gone, 422 invalid).

Why not the official client: its calls block, and the controller's claims are a handful of
small conditional PATCHes whose latency decides throughput. Credentials are loaded by the
official `kubernetes.config` (kubeconfig or in-cluster), so both behave alike, and kept fresh
(exec plugins, OIDC, rotated service-account tokens). The controller's kopf logs in with the
same credentials (`kopf_connection`), so one source serves both. It counts the requests it
makes by verb, for the benchmarks' writes-per-bind figure.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import aiohttp
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from pcipt import constants as c

PatchType = Literal["merge", "json", "apply", "strategic"]
_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
    "strategic": "application/strategic-merge-patch+json",
}
SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class ApiError(Exception):
    """The API server refused a request."""

    def __init__(self, status: int, reason: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body


class Conflict(ApiError):
    """409: a precondition (resourceVersion, JSON-patch test) failed, or the object exists."""


class NotFound(ApiError):
    """404: the object (or its kind) does not exist."""


class Invalid(ApiError):
    """422: the object failed validation."""


def _error(status: int, body: Any) -> ApiError:
    reason = body.get("reason", "") if isinstance(body, dict) else ""
    message = body.get("message", str(body)) if isinstance(body, dict) else str(body)
    cls = {409: Conflict, 404: NotFound, 422: Invalid}.get(status, ApiError)
    return cls(status, reason, message, body)


@dataclass
class Credentials:
    """Where the API server is and how to prove who we are, as kubectl would find them.

    Tokens expire: a projected service-account token is re-read once a minute; a kubeconfig
    token from an exec plugin or an OIDC/GCP auth provider is refreshed by the kubeconfig
    loader's own hook when its expiry passes, and reloaded from scratch after a 401."""

    host: str
    ssl: ssl.SSLContext | bool
    token: str | None = None
    token_file: Path | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    refresh: Callable[[], str | None] | None = None
    """Returns a current token (running the exec plugin or auth provider when it expired)."""
    reload: Callable[[], Credentials] | None = None
    """Loads the credentials again from their source (after a 401)."""
    _token_read: float = 0.0

    def auth_headers(self) -> dict[str, str]:
        if self.token_file is not None and time.monotonic() - self._token_read > 60:
            self.token = self.token_file.read_text().strip()
            self._token_read = time.monotonic()
        elif self.refresh is not None:
            self.token = self.refresh()
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def reloaded(self) -> bool:
        """Take fresh credentials from the source; whether the token changed."""
        if self.token_file is not None:
            before, self._token_read = self.token, 0.0
            self.auth_headers()
            return self.token != before
        if self.reload is None:
            return False
        fresh = self.reload()
        changed = fresh.token != self.token
        self.token, self.refresh = fresh.token, fresh.refresh
        return changed


def _token_of(cfg: k8s_client.Configuration) -> str | None:
    for key in ("authorization", "BearerToken"):
        if cfg.api_key.get(key):
            return str(cfg.api_key[key]).removeprefix("Bearer ").strip()
    return None


def load_credentials(kubeconfig: str | None = None, context: str | None = None) -> Credentials:
    """Credentials as kubectl would find them: the given kubeconfig, $KUBECONFIG,
    ~/.kube/config, or in-cluster service account."""
    cfg = k8s_client.Configuration()
    in_cluster = False
    try:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=cfg
        )
    except (k8s_config.ConfigException, FileNotFoundError, TypeError):
        if kubeconfig is not None:
            raise
        k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        in_cluster = True
    ctx: ssl.SSLContext | bool
    if cfg.verify_ssl:
        ctx = (
            ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.ssl_ca_cert
            else ssl.create_default_context()
        )
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    else:
        ctx = False
    hook: Callable[[k8s_client.Configuration], None] | None = cfg.refresh_api_key_hook

    def refresh() -> str | None:
        if hook is not None:
            hook(cfg)  # runs the exec plugin or auth provider again only once the token expired
        return _token_of(cfg)

    return Credentials(
        host=cfg.host.rstrip("/"),
        ssl=ctx,
        token=_token_of(cfg),
        token_file=SA_TOKEN if in_cluster and SA_TOKEN.exists() else None,
        ca_file=cfg.ssl_ca_cert or None,
        cert_file=cfg.cert_file or None,
        key_file=cfg.key_file or None,
        refresh=refresh if hook is not None and not in_cluster else None,
        reload=None if in_cluster else (lambda: load_credentials(kubeconfig, context)),
    )


def crd_path(
    plural: str,
    name: str | None = None,
    *,
    namespace: str | None = None,
    subresource: str | None = None,
    group: str = c.GROUP,
    version: str = c.VERSION,
) -> str:
    """The REST path of a custom resource collection or object."""
    base = f"/apis/{group}/{version}"
    if namespace is not None:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name is not None:
        base += f"/{quote(name)}"
    if subresource is not None:
        base += f"/{subresource}"
    return base


@dataclass
class KubeClient:
    """One aiohttp session to one API server. Use as an async context manager."""

    creds: Credentials
    user_agent: str = "pcipt"
    timeout: float = 30.0
    pool: int = 64
    requests: Counter[str] = field(default_factory=Counter)
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.creds.ssl, limit=self.pool),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": self.user_agent},
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def writes(self) -> int:
        return sum(
            n for verb, n in self.requests.items() if verb in ("POST", "PUT", "PATCH", "DELETE")
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        parse: bool = True,
    ) -> Any:
        """`parse=False`: a success's body is not decoded (None is returned): for writes whose
        answer nobody reads, a large object's JSON is the biggest cost on the client."""
        await self.open()
        assert self._session is not None
        url = self.creds.host + path
        if params:
            url += "?" + urlencode(params)
        headers = {"Accept": "application/json", **self.creds.auth_headers()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        for attempt in (1, 2):
            self.requests[method] += 1
            async with self._session.request(method, url, data=data, headers=headers) as resp:
                text = await resp.text()
                if not parse and resp.status < 400:
                    return None
                try:
                    payload: Any = json.loads(text) if text else None
                except ValueError:
                    if resp.status < 400:
                        raise
                    payload = None  # an error in plain text ("404 page not found")
                if resp.status == 401 and attempt == 1 and self.creds.reloaded():
                    # The token expired under us: once more with the fresh one.
                    headers = {**headers, **self.creds.auth_headers()}
                    continue
                if resp.status >= 400:
                    raise _error(resp.status, payload if payload is not None else text)
                return payload
        raise AssertionError("unreachable")

    async def get(self, path: str) -> dict[str, Any]:
        return dict(await self.request("GET", path))

    async def list(
        self, path: str, *, label_selector: str | None = None, field_selector: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, str] = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        return dict(await self.request("GET", path, params=params))

    async def create(
        self, path: str, body: Mapping[str, Any], *, field_manager: str | None = None
    ) -> dict[str, Any]:
        params = {"fieldManager": field_manager} if field_manager else None
        return dict(await self.request("POST", path, params=params, body=body))

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT: conditional on body.metadata.resourceVersion when it carries one."""
        return dict(await self.request("PUT", path, body=body))

    async def patch(
        self,
        path: str,
        body: Any,
        *,
        patch_type: PatchType = "merge",
        field_manager: str | None = None,
        force: bool = False,
        parse: bool = True,
    ) -> dict[str, Any]:
        """The object as written ({} with parse=False)."""
        params: dict[str, str] = {}
        if field_manager:
            params["fieldManager"] = field_manager
        if force:
            params["force"] = "true"
        got = await self.request(
            "PATCH",
            path,
            params=params,
            body=body,
            content_type=_CONTENT_TYPES[patch_type],
            parse=parse,
        )
        return dict(got) if got is not None else {}

    async def delete(self, path: str, *, body: Mapping[str, Any] | None = None) -> Any:
        """DELETE; `body` may carry DeleteOptions, e.g. preconditions on resourceVersion."""
        return await self.request("DELETE", path, body=body)

    async def watch(
        self,
        path: str,
        *,
        resource_version: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream watch events from resource_version on, decoded."""
        async for line in self.watch_lines(
            path,
            resource_version=resource_version,
            label_selector=label_selector,
            field_selector=field_selector,
            timeout=timeout,
        ):
            yield json.loads(line)

    async def watch_lines(
        self,
        path: str,
        *,
        resource_version: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout: int = 300,
    ) -> AsyncIterator[bytes]:
        """Stream watch events from resource_version on, one undecoded JSON line each (with
        bookmarks), so that a caller may pass over one without decoding it. Lines are as long
        as the objects they carry (no line-length cap: an object may be up to 1.5 MB)."""
        await self.open()
        assert self._session is not None
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout),
            "allowWatchBookmarks": "true",
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        url = f"{self.creds.host}{path}?{urlencode(params)}"
        headers = {"Accept": "application/json", **self.creds.auth_headers()}
        self.requests["WATCH"] += 1
        async with self._session.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout + 30)
        ) as resp:
            if resp.status >= 400:
                raise _error(resp.status, await resp.text())
            rest = b""
            async for chunk in resp.content.iter_any():
                lines = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line.strip():
                        yield line
            if rest.strip():
                yield rest


async def retry_transient(fn: Any, *args: Any, attempts: int = 8, **kwargs: Any) -> Any:
    """Call fn, retrying connection errors and 429/5xx with backoff (not 4xx, which are answers)."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            return await fn(*args, **kwargs)
        except ApiError as e:
            if e.status not in (429, 500, 502, 503, 504) or attempt == attempts - 1:
                raise
        except (TimeoutError, aiohttp.ClientError, OSError):
            if attempt == attempts - 1:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")
