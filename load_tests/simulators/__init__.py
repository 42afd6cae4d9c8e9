"""Traffic simulators (no network code): honest users, batch jobs and extraction attackers."""

from load_tests.simulators.attackers import (
    BatchingCollector,
    BulkExtractor,
    Hydra,
    LowAndSlow,
    Mimic,
    attackers,
)
from load_tests.simulators.base import (
    Query,
    QueryStream,
    Reply,
    Simulator,
    reply_text,
    reply_texts,
)
from load_tests.simulators.honest import BatchUser, HonestUser, honest_population

__all__ = [
    "BatchUser",
    "BatchingCollector",
    "BulkExtractor",
    "HonestUser",
    "Hydra",
    "LowAndSlow",
    "Mimic",
    "Query",
    "QueryStream",
    "Reply",
    "Simulator",
    "attackers",
    "honest_population",
    "reply_text",
    "reply_texts",
]
