"""Live reload: keep serving the last good settings, swap in new ones when they validate."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from guard_server.config.loader import ConfigError, Settings, files_digest, load_settings

log = logging.getLogger(__name__)

_RESTART_ONLY = (
    "server",
    "upstreams",
    "state",
    "bundled_teacher",
    "secret",
    "audit",
    "logging",
    "tracing",
)


class SettingsHolder:
    """Holds the current settings; ``reload()`` replaces them only with a valid new config."""

    def __init__(
        self,
        settings: Settings,
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_reload = on_reload
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Settings:
        """The settings in force; a request reads this once and keeps that snapshot."""
        return self._settings

    async def reload(self) -> bool:
        """Load the config file again; keep the old settings if the new ones are invalid."""
        async with self._lock:
            old = self._settings
            try:
                new = await asyncio.to_thread(load_settings, old.path)
            except ConfigError as exc:
                log.error("config reload rejected, still serving the previous config:\n%s", exc)
                self._notify(False)
                return False
            new = self._keep_restart_only_sections(old, new)
            self._settings = new
            log.info(
                "config reloaded: %d tiers, %d client keys",
                len(new.tiers),
                len(new.clients_by_key_hash),
            )
            self._notify(True)
            return True

    def changed_on_disk(self) -> bool:
        """Whether any config or policy file differs from what was loaded."""
        digest = files_digest(self._settings.files)
        return digest is not None and digest != self._settings.digest

    async def watch(self) -> None:
        """Poll the files' contents and reload on change (sees Kubernetes symlink swaps too)."""
        while True:
            await asyncio.sleep(self._settings.config.server.reload_interval_s)
            if await asyncio.to_thread(self.changed_on_disk):
                await self.reload()

    def _notify(self, ok: bool) -> None:
        if self._on_reload is not None:
            self._on_reload(ok)

    @staticmethod
    def _keep_restart_only_sections(old: Settings, new: Settings) -> Settings:
        changed = [
            name for name in _RESTART_ONLY if getattr(old.config, name) != getattr(new.config, name)
        ]
        if not changed and (new.secret, new.upstream_api_keys, new.redis_password) == (
            old.secret,
            old.upstream_api_keys,
            old.redis_password,
        ):
            return new
        log.warning(
            "config sections %s changed; they take effect after a restart, "
            "policies and clients are applied now",
            ", ".join(changed) or "a secret's value",
        )
        kept = {name: getattr(old.config, name) for name in _RESTART_ONLY}
        config = new.config.model_copy(update=kept)
        return dataclasses.replace(
            new,
            config=config,
            secret=old.secret,
            secret_is_ephemeral=old.secret_is_ephemeral,
            upstream_api_keys=old.upstream_api_keys,
            redis_password=old.redis_password,
        )
