"""Typed keys for what the aiohttp application holds."""

import asyncio

from aiohttp import web

from guard_server.config.reload import SettingsHolder
from guard_server.metrics import GuardMetrics
from guard_server.pipeline.audit import AuditLog
from guard_server.state.base import StateStore
from guard_server.state.review import ReviewState
from guard_server.upstream.pool import UpstreamPool

SETTINGS = web.AppKey("settings", SettingsHolder)
METRICS = web.AppKey("metrics", GuardMetrics)
UPSTREAMS = web.AppKey("upstreams", UpstreamPool)
STATE = web.AppKey("state", StateStore)
DRAINING = web.AppKey("draining", asyncio.Event)
REVIEW = web.AppKey("review", ReviewState)
AUDIT = web.AppKey("audit", AuditLog)
