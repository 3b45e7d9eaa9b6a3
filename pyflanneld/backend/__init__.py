"""Backends: see :mod:`pyflanneld.backend.base` for the interface."""

from .base import (  # noqa: F401
    Backend,
    BackendContext,
    BackendError,
    BackendInfo,
    ExternalInterface,
    PeerSetBackend,
    backend_class,
    register_backend,
    registered_types,
)
