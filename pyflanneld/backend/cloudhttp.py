"""What the cloud-route backends (aws-vpc, gce) share: settings, optional imports, metadata
requests, one-line errors and the retry loop that keeps the daemon up while the cloud says no.

Life cycle of a cloud backend (see :class:`CloudRouteBackend`):

* ``register()`` checks that the cloud SDK is installed (a missing package is fatal: one line
  naming ``pip install 'pyflanneld[cloud]'``) and returns MTU = interface MTU, no BackendData.
* ``start(lease)`` makes one attempt to put the route for the lease's subnet in the cloud's
  route table (``ensure_route``) and waits for it up to START_WAIT seconds (a slow cloud does not
  hold back subnet.env and readiness longer than that; the attempt carries on in the background).
  If it fails, the failure is logged as one line and a background task retries: with exponential backoff (1 s, 2 s, … 30 s) for errors that fix themselves (API
  unreachable, throttling, 5xx), every ``PYFLANNELD_CLOUD_RETRY_INTERVAL`` seconds (default 60)
  for errors a human must fix (permission, quota, configuration). The lease is kept and the daemon
  stays up either way. A later ``start`` (lease changed) cancels the old task and starts over.
* Peer leases need nothing (the cloud routes traffic); the peer set is tracked for ``/peers``.
* ``close()`` stops the retry task; the cloud route stays, as upstream.
* Blocking SDK calls run in daemon threads (:meth:`CloudRouteBackend.in_thread`): a call stuck on
  a black-holed API never delays the daemon's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import threading
from types import ModuleType
from typing import Any

import httpx
import structlog

from ..subnet.lease import Lease
from .base import BackendContext, BackendError, BackendInfo, PeerSetBackend

log = structlog.get_logger()

INSTALL_HINT = "pip install 'pyflanneld[cloud]'"
RETRY_INTERVAL_ENV = "PYFLANNELD_CLOUD_RETRY_INTERVAL"
DEFAULT_RETRY_INTERVAL = 60.0
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
METADATA_TIMEOUT = 2.0
START_WAIT = 5.0


class CloudError(Exception):
    """One line naming the cause and the fix. retryable: the cause may go away by itself."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def require(module: str, backend: str, package: str) -> ModuleType:
    """Import an optional cloud SDK module, or fail with the one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendError(f"the {backend} backend needs the Python package {package}, which is not installed: "
                           f"{INSTALL_HINT}") from None


def setting(ctx: BackendContext, field: str, env: str, default: str) -> str:
    """A per-cloud setting: environment variable, else the Backend field, else the default."""
    value = os.environ.get(env, "").strip()
    if value:
        return value
    v = ctx.config.backend_option(field)
    if v is None or v == "":
        return default
    if not isinstance(v, str):
        raise BackendError(f'Backend.{field} must be a string (a URL), got {type(v).__name__}')
    return v


def retry_interval() -> float:
    raw = os.environ.get(RETRY_INTERVAL_ENV, "")
    try:
        return max(0.1, float(raw)) if raw else DEFAULT_RETRY_INTERVAL
    except ValueError:
        return DEFAULT_RETRY_INTERVAL


def http_error(what: str, url: str, e: Exception, hint: str = "") -> CloudError:
    """A transport failure (refused, timeout, DNS) talking to a cloud service: retryable."""
    reason = str(e) or type(e).__name__
    return CloudError(f"{what} unreachable at {url} ({reason}){hint}", retryable=True)


class MetadataSession:
    """Requests to a link-local metadata service (never through a proxy), transport errors as
    retryable CloudError naming `what` and `hint`. Use as ``async with MetadataSession(...) as m``."""

    def __init__(self, what: str, hint: str = "", timeout: float = METADATA_TIMEOUT):
        self.what, self.hint = what, hint
        self.client = httpx.AsyncClient(trust_env=False, timeout=timeout)

    async def __aenter__(self) -> MetadataSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                      none_on_read_timeout: bool = False) -> Any:
        """→ httpx.Response; None on a read timeout when none_on_read_timeout."""
        try:
            return await self.client.request(method, url, headers=headers or {})
        except httpx.ReadTimeout as e:
            if none_on_read_timeout:
                return None
            raise http_error(self.what, url, e, self.hint) from None
        except httpx.HTTPError as e:
            raise http_error(self.what, url, e, self.hint) from None


class CloudRouteBackend(PeerSetBackend):
    """A backend whose only job is one route in a cloud route table (see the module docstring)."""

    cloud_name = "cloud"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._task: asyncio.Task | None = None
        self.route_ready = False  # the cloud route for our subnet is known to be in place
        self.route_error = ""  # the last failure, "" when none

    def readiness(self) -> tuple[bool, str]:
        if self.route_ready:
            return True, ""
        return False, f"{self.type_name} route for our subnet not in place" + (
            f": {self.route_error}" if self.route_error else " yet")

    # --- what a cloud implements ---------------------------------------------------------------
    def check_dependencies(self) -> None:
        """Import the cloud SDK (raise BackendError with the install hint when missing)."""

    async def ensure_route(self, lease: Lease) -> None:
        """Make the cloud route table route lease.subnet to this instance; raise CloudError."""
        raise NotImplementedError

    # --- the backend interface ---------------------------------------------------------------
    async def register(self) -> BackendInfo:
        self.check_dependencies()
        return BackendInfo(mtu=self.ctx.ext.mtu, backend_type=self.type_name)

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        await self._stop_task()
        self.route_ready = False
        first: asyncio.Future = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(own_lease, first), name=f"{self.type_name}-route")
        await asyncio.wait({first}, timeout=START_WAIT)
        if not first.done():
            log.info(f"{self.cloud_name} API slow to answer; going on, the route follows in the background",
                     backend=self.type_name, subnet=str(own_lease.subnet), waited=START_WAIT)

    async def ensure_peer(self, lease: Lease) -> None:
        pass  # the cloud route table carries every subnet; nothing to do per peer

    async def drop_peer(self, lease: Lease) -> None:
        pass

    async def close(self) -> None:
        await self._stop_task()

    # --- attempts and retries ----------------------------------------------------------------
    async def _attempt(self, lease: Lease, first: bool = False) -> CloudError | None:
        try:
            await self.ensure_route(lease)
        except CloudError as e:
            error = e
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug or an SDK surprise: one line, retried slowly
            error = CloudError(f"unexpected {type(e).__name__}: {e}")
        else:
            self.route_ready, self.route_error = True, ""
            if not first:
                log.info("cloud route in place after retrying", backend=self.type_name, subnet=str(lease.subnet))
            return None
        self.route_ready, self.route_error = False, str(error)
        return error

    def _report(self, lease: Lease, error: CloudError, wait: float) -> None:
        if error.retryable:
            log.warning(f"{self.cloud_name} route not programmed yet, retrying", backend=self.type_name,
                        subnet=str(lease.subnet), error=str(error), retry_in=round(wait, 1))
        else:
            log.error(f"{self.cloud_name} route not programmed", backend=self.type_name, subnet=str(lease.subnet),
                      error=str(error), retry_in=round(wait, 1))

    async def _run(self, lease: Lease, first: asyncio.Future) -> None:
        try:
            error = await self._attempt(lease, first=True)
        finally:
            if not first.done():
                first.set_result(None)
        if error is not None:
            await self._retry(lease, error)

    async def _retry(self, lease: Lease, error: CloudError) -> None:
        backoff = BACKOFF_START
        while True:
            slow = retry_interval()
            if error.retryable:
                wait = min(backoff, BACKOFF_MAX, slow)
                backoff *= 2
            else:
                wait, backoff = slow, BACKOFF_START
            self._report(lease, error, wait)
            await asyncio.sleep(wait)
            next_error = await self._attempt(lease)
            if next_error is None:
                return
            error = next_error

    async def _stop_task(self) -> None:
        t, self._task = self._task, None
        if t is not None and not t.done():
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001, S110 - the task logs its own failures
                pass

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        """Run a blocking SDK call in a daemon thread (not the loop's executor, whose threads the
        interpreter waits for at exit) and await its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def deliver(result: Any, error: BaseException | None) -> None:
            if fut.done():
                return  # the caller was cancelled meanwhile
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        def work() -> None:
            result, error = None, None
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                error = e
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(deliver, result, error)

        threading.Thread(target=work, name=f"{self.type_name}-api", daemon=True).start()
        return await fut
