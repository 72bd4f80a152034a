"""Stop strings on detokenized text, including stop strings split across deltas."""

from __future__ import annotations

from gateway.stop_strings import StopStringMatcher


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> str:
    return "".join(matcher.feed(delta) for delta in deltas) + matcher.flush()


def test_stop_string_split_across_deltas_is_cut_with_everything_after_it() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("Hello </") == "Hello "
    assert matcher.feed("en") == ""
    assert matcher.feed("d> and more") == ""
    assert matcher.stopped
    assert matcher.flush() == ""


def test_held_text_is_released_once_it_cannot_become_a_stop_string() -> None:
    matcher = StopStringMatcher(["<x>"])
    assert matcher.feed("a <") == "a "
    assert matcher.feed("b") == "<b"
    assert not matcher.stopped


def test_earliest_stop_string_wins() -> None:
    matcher = StopStringMatcher(["world", "lo"])
    assert matcher.feed("hello world") == "hel"
    assert matcher.stopped


def test_stop_string_inside_one_delta_character_by_character() -> None:
    text = "The answer is 42. STOP here"
    matcher = StopStringMatcher(["STOP"])
    assert feed_all(matcher, list(text)) == "The answer is 42. "
    assert matcher.stopped


def test_held_partial_stop_is_flushed_at_the_end() -> None:
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("total ##") == "total "
    assert matcher.flush() == "##"
    assert not matcher.stopped


def test_without_stop_strings_text_passes_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == "anything"
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    assert feed_all(StopStringMatcher([""]), ["a", "b"]) == "ab"
