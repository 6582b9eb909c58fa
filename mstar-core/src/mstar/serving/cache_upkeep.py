"""A server's part in the shared weight cache (`mstar.weights.cache`): it leases the hub
snapshots it serves for as long as it runs, so that neither `mstar weights rm` nor any
server's eviction removes them under it; renews the lease every third of
`cache_check_interval` (a lease expires after three intervals without, or as soon as its
process is gone); and with `cache_gc` on evicts by the settings' limits at start and
every interval after. Failures are logged, never fatal: a read-only shared cache serves
without a lease."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence

from mstar.config.settings import ServerSettings
from mstar.runtime.builder import LoadOptions
from mstar.weights.cache import LeaseHandle, WeightCache, WeightsError
from mstar.weights.eviction import EvictionPolicy

log = logging.getLogger("mstar.serving")

_FAILURES = (WeightsError, OSError, sqlite3.Error)


class CacheUpkeep:
    """Holds `server`'s lease on `repos` and evicts by `policy` (None: never) until
    `stop`."""

    def __init__(self, cache: WeightCache, repos: Sequence[tuple[str, str | None]],
                 server: str, *, check_interval: float, policy: EvictionPolicy | None = None):
        self.cache, self.policy, self.interval = cache, policy, check_interval
        self.lease: LeaseHandle | None = None
        if repos:
            try:
                self.lease = cache.lease(repos, server, check_interval=check_interval)
            except _FAILURES as err:
                log.warning("no lease on the weights served (%s): another server's "
                            "eviction or `mstar weights rm` could remove them", err)
        #: set after each background eviction (tests wait on it)
        self.collected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-upkeep", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ticks = 0
        while True:
            if self.policy is not None and ticks % 3 == 0:
                self._collect(self.policy)
            if self._stop.wait(self.interval / 3):
                return
            ticks += 1
            if self.lease is not None:
                try:
                    if not self.lease.heartbeat():
                        log.warning("the weights lease expired while this server stalled: "
                                    "the weights it serves may be evicted")
                except _FAILURES as err:
                    log.warning("could not renew the weights lease: %s", err)

    def _collect(self, policy: EvictionPolicy) -> None:
        try:
            for entry in self.cache.gc(policy):
                log.info("evicted %s@%s (%d bytes) from the weight cache %s", entry.repo,
                         entry.revision, entry.size_bytes, self.cache.cache_dir)
        except _FAILURES as err:
            log.warning("weight cache eviction failed: %s", err)
        self.collected.set()

    def stop(self) -> None:
        """Stop the background work and release the lease."""
        self._stop.set()
        self._thread.join()
        if self.lease is not None:
            try:
                self.lease.release()
            except _FAILURES as err:
                log.warning("could not release the weights lease (it expires): %s", err)


def start_upkeep(settings: ServerSettings, options: LoadOptions, server: str) -> CacheUpkeep:
    """The upkeep of a server with `settings` loading by `options` (its hub sources at
    the commits `options.at_commits()` fixed)."""
    return CacheUpkeep(WeightCache(options.cache_dir), list(options.hub_repos().values()),
                       server, check_interval=settings.cache_check_interval,
                       policy=settings.eviction_policy() if settings.cache_gc else None)
