"""What the cloud-route backends (aws-vpc, gce) share: settings, optional imports, metadata
requests, one-line errors and the convergence loop that keeps the cloud's routes as they should be.

Life cycle of a cloud backend (see :class:`CloudRouteBackend`):

* ``register()`` checks that the cloud SDK is installed (a missing package is fatal: one line
  naming ``pip install 'pyflanneld[cloud]'``) and returns MTU = interface MTU, no BackendData.
* ``start(lease)`` starts the convergence loop for the lease's subnet and waits for its first
  pass up to START_WAIT seconds (a slow cloud does not hold back subnet.env and readiness longer
  than that; the pass carries on in the background). A later ``start`` (lease changed) cancels
  the old loop and starts over.
* The loop, one pass at a time: ``ensure_route`` reads what the cloud has (desired: the route
  for our subnet to this instance, in every route table / in our network; actual: what the API
  answers) and writes only what differs. After a pass that succeeded the next one follows in
  ``PYFLANNELD_CLOUD_CHECK_INTERVAL`` seconds (default 60, 0 = never), ±20 % jitter so that a
  cluster's nodes do not call the API in step. After a failure (one log line naming cause and
  fix) the next pass follows with exponential backoff (1 s, 2 s, … 30 s) for errors that fix
  themselves (API unreachable, throttling, 5xx, a resource not ready yet), every
  ``PYFLANNELD_CLOUD_RETRY_INTERVAL`` seconds (default 60) for errors a human must fix
  (permission, quota, configuration). The lease is kept and the daemon stays up either way.
* ``readiness()`` is false from the moment a pass finds the route missing (or fails) until a
  pass has put it back; the reason names the route and the table or network.
* ``reconcile()`` asks for a pass now (the loop's wait ends early); it does not wait for it.
* Peer leases need nothing (the cloud routes traffic); the peer set is tracked for ``/peers``.
* ``close()`` stops the loop; the cloud route stays, as upstream.
* Blocking SDK calls run in daemon threads (:func:`~pyflanneld.backend.base.in_daemon_thread`): a call stuck on
  a black-holed API never delays the daemon's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import os
import random
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
CHECK_INTERVAL_ENV = "PYFLANNELD_CLOUD_CHECK_INTERVAL"
DEFAULT_CHECK_INTERVAL = 60.0
CHECK_JITTER = 0.2  # each wait between checks is the interval ± 20 %
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
METADATA_TIMEOUT = 2.0
START_WAIT = 5.0


class CloudError(Exception):
    """One line naming the cause and the fix. retryable: the cause may go away by itself;
    code: the cloud's error code when the API gave one ("RouteLimitExceeded", "resourceNotReady")."""

    def __init__(self, message: str, retryable: bool = False, code: str = ""):
        super().__init__(message)
        self.retryable = retryable
        self.code = code

    def within(self, context: str) -> CloudError:
        """The same error with `context` ("route 10.1.7.0/24 missing in rtb-1") in front."""
        return CloudError(f"{context}: {self}", self.retryable, self.code)

    @staticmethod
    def combine(errors: list[CloudError]) -> CloudError:
        """Several failures (one per route table, say) as one line; retried soon if any may clear
        up by itself (the next pass retries them all)."""
        if len(errors) == 1:
            return errors[0]
        return CloudError("; ".join(str(e) for e in errors), any(e.retryable for e in errors))


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


def _seconds(env: str, default: float, zero_allowed: bool) -> float:
    """A duration from the environment: a number of seconds, at least 0.1 (or exactly 0 when
    zero_allowed); the default when unset or not a finite number."""
    raw = os.environ.get(env, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    if not math.isfinite(value):
        return default
    if zero_allowed and value == 0:
        return 0.0
    return max(0.1, value)


def retry_interval() -> float:
    """Seconds between attempts while an error a person must fix persists (≥ 0.1)."""
    return _seconds(RETRY_INTERVAL_ENV, DEFAULT_RETRY_INTERVAL, False)


def check_interval() -> float:
    """Seconds between periodic checks of a route in place; 0 = no periodic checks."""
    return _seconds(CHECK_INTERVAL_ENV, DEFAULT_CHECK_INTERVAL, True)


def jittered(seconds: float) -> float:
    """`seconds` ± CHECK_JITTER, uniformly."""
    return seconds * random.uniform(1 - CHECK_JITTER, 1 + CHECK_JITTER)


def http_error(what: str, url: str, e: Exception, hint: str = "") -> CloudError:
    """A transport failure (refused, timeout, DNS) talking to a cloud service: retryable."""
    reason = str(e) or type(e).__name__
    return CloudError(f"{what} unreachable at {url} ({reason}){hint}", retryable=True)


class MetadataSession:
    """Requests to a link-local metadata service (never through a proxy), transport errors as
    retryable CloudError naming `what` and `hint`. Use as ``async with MetadataSession(...) as m``."""

    def __init__(self, what: str, hint: str = "", timeout_s: float = METADATA_TIMEOUT):
        self.what, self.hint = what, hint
        self.client = httpx.AsyncClient(trust_env=False, timeout=timeout_s)

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
    """A backend whose only job is our route in the cloud's route table(s), kept there by a
    convergence loop (see the module docstring)."""

    cloud_name = "cloud"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.route_ready = False  # the last pass found (or put) the route in place everywhere
        self.route_error = ""  # why not, "" when none: set by a pass as soon as it knows
        self.seen: set[str] = set()  # where (route table, network) a pass last found or put our route

    def readiness(self) -> tuple[bool, str]:
        if self.route_ready:
            return True, ""
        return False, f"{self.type_name} route for our subnet not in place" + (
            f": {self.route_error}" if self.route_error else " yet")

    def route_lost(self, where: str, why: str, **fields: Any) -> None:
        """Called by a pass (from its worker thread too) the moment it finds our route missing or
        wrong in `where` (a route table, a network), before repairing it: /readyz says `why` until
        a pass has put it back. A route that a pass had seen in place there was changed by someone
        else: one warning line."""
        self.route_ready, self.route_error = False, why
        if where in self.seen:
            self.seen.discard(where)
            log.warning("our cloud route was removed or changed by someone else; putting it back",
                        backend=self.type_name, problem=why, **fields)

    def route_seen(self, where: str) -> None:
        """A pass found (or put) our route in place in `where`."""
        self.seen.add(where)

    # --- what a cloud implements ---------------------------------------------------------------
    def check_dependencies(self) -> None:
        """Import the cloud SDK (raise BackendError with the install hint when missing)."""

    async def ensure_route(self, lease: Lease) -> None:
        """One pass: read the cloud's routes for lease.subnet, repair what differs from "routed to
        this instance" (calling route_lost first), tidy up; raise CloudError if anything is still
        not in place. Must be idempotent: with nothing to repair it only reads."""
        raise NotImplementedError

    # --- the backend interface ---------------------------------------------------------------
    async def register(self) -> BackendInfo:
        self.check_dependencies()
        return BackendInfo(mtu=self.ctx.ext.mtu, backend_type=self.type_name)

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        await self._stop_task()
        self.route_ready, self.route_error = False, ""
        self.seen.clear()
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

    async def reconcile(self) -> None:
        """Ask the loop for a pass now (returns at once; the pass runs in the background)."""
        self._wake.set()

    async def close(self) -> None:
        await self._stop_task()

    # --- the convergence loop ----------------------------------------------------------------
    async def _attempt(self, lease: Lease, failing: bool) -> CloudError | None:
        """One pass; failing: the previous pass failed (its success is then worth a line)."""
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
            if failing:
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
            error = await self._attempt(lease, failing=False)
        finally:
            if not first.done():
                first.set_result(None)
        backoff = BACKOFF_START
        while True:
            if error is None:
                backoff = BACKOFF_START
                interval = check_interval()
                wait = jittered(interval) if interval else None
            elif error.retryable:
                wait = min(backoff, BACKOFF_MAX, retry_interval())
                backoff *= 2
                self._report(lease, error, wait)
            else:
                wait, backoff = retry_interval(), BACKOFF_START
                self._report(lease, error, wait)
            await self._pause(wait)
            error = await self._attempt(lease, failing=error is not None)

    async def _pause(self, seconds: float | None) -> None:
        """Wait `seconds` (None: forever), or less when reconcile() asked for a pass (also while
        the previous pass ran)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

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
