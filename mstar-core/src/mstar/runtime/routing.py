"""Which data-parallel replica runs a request (`DeploymentConfig.replicas`).

The conductor picks a replica once, when a request is submitted, and every walk of the
request then runs on that replica's ranks, so its KV pages, streams and forks never cross
replicas. The policy: the live replica with the fewest live requests, ties to the one
picked least recently (so requests that arrive one after another take turns). With prefix
caching, a request whose prompt starts like another's (the same first KV page: the
frontend's `prefix_key`) prefers the replica its key hashes to (rendezvous hashing over
the live replicas, so a replica's death moves only its own keys) while that replica runs
at most `AFFINITY_SLACK` more requests than the least loaded one: alike prompts then hit
one replica's prefix cache, and a hot prefix cannot pile up on one replica. A replica any
of whose workers died is out of rotation for good (a dead rank cannot rejoin: its TP
group and the KV of its requests are gone with it).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

#: How many more live requests than the least loaded replica a prefix's replica may run
#: and still get the requests of that prefix.
AFFINITY_SLACK = 4


def prefix_key(token_ids: Sequence[int], page_size: int) -> str | None:
    """A hash of the prompt's first KV page of tokens; None for a prompt shorter than a
    page (prefix caching shares only full pages, so such a prompt gains nothing from
    affinity)."""
    if len(token_ids) < page_size:
        return None
    first = ",".join(str(int(t)) for t in token_ids[:page_size])
    return hashlib.blake2b(first.encode(), digest_size=8).hexdigest()


def _weight(key: str, replica: int) -> bytes:
    return hashlib.blake2b(f"{key}/{replica}".encode(), digest_size=8).digest()


class ReplicaRouter:
    """The replicas' live requests and which replicas are alive; `pick` chooses one."""

    def __init__(self, replicas: int):
        self.load = [0] * replicas
        self.dead: dict[int, str] = {}  # replica -> why it is out of rotation
        self._picked = [0] * replicas  # when each was last picked (a counter)
        self._clock = itertools.count(1)

    def live(self) -> list[int]:
        return [r for r in range(len(self.load)) if r not in self.dead]

    def pick(self, key: str | None = None) -> int | None:
        """The replica for a new request with prefix `key` (None: by load only), counted
        as running it; None when every replica is dead."""
        live = self.live()
        if not live:
            return None
        chosen = min(live, key=lambda r: (self.load[r], self._picked[r], r))
        if key is not None:
            preferred = max(live, key=lambda r: _weight(key, r))
            if self.load[preferred] <= self.load[chosen] + AFFINITY_SLACK:
                chosen = preferred
        self.load[chosen] += 1
        self._picked[chosen] = next(self._clock)
        return chosen

    def finished(self, replica: int) -> None:
        self.load[replica] = max(0, self.load[replica] - 1)

    def kill(self, replica: int, reason: str) -> None:
        """Take `replica` out of rotation (the first reason is kept)."""
        self.dead.setdefault(replica, reason)
