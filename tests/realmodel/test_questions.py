"""The real-model question set: size, and the checker's reading of a continuation."""

from __future__ import annotations

from load_tests.realmodel.questions import Item, first_number, first_sentence, items, open_prompts


def test_the_set_has_at_least_300_distinct_questions() -> None:
    questions = items()
    assert len(questions) >= 300
    assert len({q.question for q in questions}) == len(questions)


def test_only_the_first_sentence_counts() -> None:
    capital = Item("capital", "What is the capital of Peru?", "The capital of Peru is", ("Lima",))
    assert capital.check(" Lima.")
    assert capital.check(" lima, on the coast. It is large.")
    assert not capital.check(" Cusco. Some say Lima.")
    assert not capital.check(" Limassol.")
    assert first_sentence(" 3.14 is pi. Next") == " 3.14 is pi"


def test_numbers_are_read_in_digits_or_words() -> None:
    legs = Item("count", "How many legs?", "A spider has", ("8",), numeric=True)
    assert legs.check(" 8 legs.")
    assert legs.check(" eight legs.")
    assert not legs.check(" two pairs of legs, so 8.")
    assert first_number(" 1,000 years") == 1000


def test_symbols_are_case_sensitive() -> None:
    gold = Item("symbol", "Gold?", "The chemical symbol for gold is", ("Au",), case_sensitive=True)
    assert gold.check(" Au.")
    assert not gold.check(" au, as in aurum.")


def test_open_prompts_split_topics() -> None:
    train, heldout = open_prompts("train"), open_prompts("heldout")
    assert len(train) == 180 and len(heldout) == 60
    assert not set(train) & set(heldout)
