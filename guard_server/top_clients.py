"""``guard_client_risk``: the top K clients of the review board, as a gauge of their score.

A client id is an unbounded label, so this gauge shows at most ``metrics.top_clients``
clients (K) at any scrape: the board's highest, ordered by the action their score calls for
and then by score. End users' scopes are on the board too (``app~u:<hash>``, and
``app~n:<fingerprint>`` for a key's newcomers of one request shape), with their key's tier.
Its series are computed at scrape time from the review state, so a client that leaves the
top K leaves the exposition at once (no stale series). With Redis every worker and replica
reads the same board, so every pod exports the same K clients (within one review tick);
dashboards and alerts take ``max by (client)`` over pods.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from guard_server.config.reload import SettingsHolder
from guard_server.detection.end_users import client_of_scope
from guard_server.pipeline.plan import planned_action
from guard_server.state.review import ReviewState, board_action, board_score

NAME = "guard_client_risk"
LABELS = ("client", "tier", "action", "assessed", "mode")


class TopClientsCollector(Collector):
    """Exports the board's top K clients with their tier, action, assessed action and mode
    (``enforce``, ``shadow``, or ``pinned`` when an operator's pin decides the action)."""

    def __init__(self, review: ReviewState, holder: SettingsHolder) -> None:
        self.review = review
        self.holder = holder

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            NAME,
            "Risk score (0..1) of the top metrics.top_clients clients of the review board, "
            "ranked by the action their score calls for, then by score.",
            labels=LABELS,
        )
        settings = self.holder.current
        clients = settings.clients_by_id
        for client_id, value in self.review.top(settings.config.metrics.top_clients):
            client = clients.get(client_of_scope(client_id))  # an end user's: its key's
            if client is None:  # removed from the config since
                continue
            assessed = board_action(value)
            pin = self.review.pin_of(client_id)
            mode = "pinned" if pin is not None else client.detection_mode
            action = planned_action(client, assessed, pin)
            family.add_metric(
                [client_id, client.tier.name, action, assessed, mode], board_score(value)
            )
        yield family
