"""The state-store interface: one atomic admission and one settlement per request."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from guard_server.detection.features import RequestFeatures
from guard_server.detection.profile import CampaignProfile, ClientProfile


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """The limits of one scope (a client); None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None

    @property
    def unlimited(self) -> bool:
        """Whether no limit is set at all."""
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.concurrent_requests is None
        )


@dataclass(slots=True)
class Admission:
    """The verdict for one request, with what the response headers report."""

    allowed: bool
    exceeded: str | None = None  # "requests", "tokens" or "concurrency"
    retry_after_s: float = 0.0
    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    # The configured ("shown") limits' bucket while a tighter one is enforced; otherwise the
    # same as remaining_* (what x-ratelimit-remaining-* shows).
    shown_requests: float | None = None
    shown_tokens: float | None = None
    in_flight: int = 0
    slot: str = ""
    reserved_tokens: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class AdmitRequest:
    """The arguments of one admission (see :meth:`StateStore.admit`). Two requests are the
    same admission whatever their slot ids."""

    scope: str
    spec: LimitSpec
    tokens: int
    slot: str = field(compare=False)
    slot_ttl_s: float
    requests: int = 1
    shown: LimitSpec | None = None


class StateUnavailable(Exception):
    """The state backend cannot be reached."""


class StateStore(abc.ABC):
    """Where limits are counted. Implementations must be atomic per scope."""

    @abc.abstractmethod
    async def admit(
        self,
        scope: str,
        spec: LimitSpec,
        tokens: int,
        slot: str,
        slot_ttl_s: float,
        *,
        requests: int = 1,
        shown: LimitSpec | None = None,
    ) -> Admission:
        """Check every limit of ``scope`` and, only if all pass, consume ``requests``
        requests (a batch counts one per prompt), reserve ``tokens`` and take concurrency
        slot ``slot`` (which expires after ``slot_ttl_s`` even if never released). A cost
        above a whole minute's allowance needs a full bucket, as tokens do.

        ``shown``: the client's configured limits while ``spec`` is a tightened version of
        them. A second pair of buckets then runs at the ``shown`` rates, spending what the
        enforced ones spend, for the headers (``Admission.shown_*``): it continues the
        bucket as it was when tightening began, and the enforced bucket takes its level
        back when it ends, so the headers never jump.
        """

    @abc.abstractmethod
    async def settle(
        self,
        scope: str,
        spec: LimitSpec,
        slot: str,
        refund_tokens: int,
        shown: LimitSpec | None = None,
    ) -> None:
        """Release ``slot`` and give back ``refund_tokens`` (negative: charge more), to the
        ``shown`` bucket too while there is one."""

    @abc.abstractmethod
    async def observe(
        self, client: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile]:
        """Fold one request into the client's profile and its fingerprint's, as one request
        per prompt it batches (timing once), in one round trip; return both."""

    @abc.abstractmethod
    async def observe_end_user(
        self, client: str, end_user_scope: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile, ClientProfile]:
        """Like :meth:`observe`, for a request naming an end user: also count
        ``end_user_scope`` among the client's end users of the day (the client profile's
        ``end_users``) and fold the request into that scope's own profile (no campaign),
        in one round trip; return the client's, its fingerprint's and the end user's."""

    @abc.abstractmethod
    async def observe_scope(self, scope: str, features: RequestFeatures) -> ClientProfile:
        """Fold one request into ``scope``'s own profile only (no campaign, no end-user
        count), as :meth:`observe_end_user` folds an end user's, and return it."""

    async def count(self, client: str, features: RequestFeatures) -> None:
        """Fold one request in, like :meth:`observe`, when the profiles are not needed."""
        await self.observe(client, features)

    @abc.abstractmethod
    async def peek(self, client: str) -> tuple[ClientProfile | None, CampaignProfile | None]:
        """The client's profile and its last fingerprint's, without changing them."""

    @abc.abstractmethod
    async def forget(self, client: str) -> None:
        """Drop the client's risk profile (its counters and distinct-prompt sketch); its
        rate-limit buckets and the profiles of the fingerprints it shares stay."""

    async def close(self) -> None:  # noqa: B027 - a no-op by default, on purpose
        """Release connections."""


class SpeculativeStore(StateStore):
    """A store whose round trips cost more than its work (a shared one, over the network).

    It takes a request's admission in the same call that observes it, under the limits its
    plan is expected to have, before the plan is made; in the rare case the plan turns out
    otherwise, :meth:`readmit` corrects it atomically. A limit holds exactly as with
    :meth:`StateStore.admit`: what a speculative admission took is given back before the
    right one is taken, and a refused or deferred one took nothing. (Until it is corrected, a
    wrong one may refuse another request the right one would have let through: never admit
    one it would have refused.)
    """

    @abc.abstractmethod
    async def observe_admit(
        self,
        client: str,
        features: RequestFeatures,
        request: AdmitRequest | None,
        *,
        want: bool,
    ) -> tuple[ClientProfile | None, CampaignProfile | None, Admission | None]:
        """Fold one request in (:meth:`StateStore.observe`; the profiles only if ``want``)
        and take ``request``'s admission, in one round trip. The admission is None when
        there is no ``request``, or when the store defers it: it would end a tightening (a
        step :meth:`readmit` could not take back), so it must be taken with ``admit``."""

    @abc.abstractmethod
    async def readmit(self, taken: AdmitRequest, request: AdmitRequest | None) -> Admission | None:
        """Give back what the allowed admission ``taken`` took (its slot, requests and
        tokens), then admit ``request`` (if any), atomically."""
