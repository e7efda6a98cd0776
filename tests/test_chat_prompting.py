"""The chat's pure parts: conversation -> prompt (cut to the context), stop strings on a stream, the fair queue."""

from __future__ import annotations

import pytest

from smolcluster.serving.fair_queue import FairQueue, QueueFull
from smolcluster.serving.prompting import (
    TURN_STOPS,
    PromptTooLong,
    Transcript,
    build_chat_prompt,
    message_text,
    prompt_budget,
    render,
)
from smolcluster.serving.stops import LeadingSpaceTrimmer, StopMatcher


def byte_ids(text: str) -> list[int]:
    """A real (if simple) tokenizer: one token per UTF-8 byte, so lengths are easy to reason about."""
    return list(text.encode())


BYTES = Transcript(byte_ids)


# -- prompting ------------------------------------------------------------------------------------------
def test_a_conversation_becomes_a_transcript_ending_with_the_answer_cue():
    msgs = [("system", "Be terse."), ("user", " Hi "), ("assistant", "Hello!"), ("user", "2+2?")]
    p = build_chat_prompt(msgs, BYTES)
    assert p.text == "System: Be terse.\nUser: Hi\nAssistant: Hello!\nUser: 2+2?\nAssistant:"
    assert p.ids == byte_ids(p.text) and p.dropped == 0
    # an answer ends where the model starts the next turn
    assert all(stop in "\n" + p.text for stop in ("\nUser:", "\nAssistant:", "\nSystem:"))


def test_oldest_turns_are_dropped_whole_and_the_system_prompt_stays():
    msgs = [("system", "S"), ("user", "a" * 30), ("assistant", "b" * 30), ("user", "c" * 30),
            ("assistant", "d" * 30), ("user", "last question")]
    full = len(render(msgs))
    without_first_exchange = len(render([msgs[0], *msgs[3:]]))
    p = build_chat_prompt(msgs, BYTES, budget=without_first_exchange)
    assert p.dropped == 2 and p.text == render([msgs[0], *msgs[3:]]) and len(p.ids) <= without_first_exchange
    # one byte less and the next exchange goes too; the prompt never opens on an orphan answer
    p = build_chat_prompt(msgs, BYTES, budget=without_first_exchange - 1)
    assert p.text == render([msgs[0], msgs[5]]) and p.dropped == 4
    assert build_chat_prompt(msgs, BYTES, budget=full).dropped == 0


def test_the_system_prompt_goes_last_and_a_last_message_too_long_is_an_error():
    msgs = [("system", "s" * 50), ("user", "q" * 20)]
    p = build_chat_prompt(msgs, BYTES, budget=len(render(msgs[1:])))
    assert p.text == render(msgs[1:])
    with pytest.raises(PromptTooLong, match="shorten it") as e:
        build_chat_prompt(msgs, BYTES, budget=len(render(msgs[1:])) - 1)
    assert e.value.n_tokens == len(render(msgs[1:])) and e.value.limit == len(render(msgs[1:])) - 1


def test_without_truncation_a_conversation_that_does_not_fit_is_refused_not_cut():
    msgs = [("user", "a" * 30), ("assistant", "b"), ("user", "c")]
    with pytest.raises(PromptTooLong, match="conversation"):
        build_chat_prompt(msgs, BYTES, budget=len(render(msgs)) - 1, truncate=False)
    assert build_chat_prompt(msgs, BYTES, budget=len(render(msgs)), truncate=False).dropped == 0


def test_the_prompt_budget_leaves_room_for_the_answer_but_at_most_half_the_context():
    assert prompt_budget(1024, 100) == 924
    assert prompt_budget(1024, 5000) == 512
    assert prompt_budget(256, 0) == 256


def test_message_text_reads_strings_and_text_parts_and_refuses_images():
    assert message_text("hi") == "hi"
    assert message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert message_text(None) == ""
    with pytest.raises(ValueError, match="only text"):
        message_text([{"type": "image_url", "image_url": {"url": "x"}}])
    with pytest.raises(ValueError, match="unknown role"):
        build_chat_prompt([("wizard", "x")], BYTES)


# -- stop strings ------------------------------------------------------------------------------------------
def test_a_stop_string_split_across_pieces_is_never_shown():
    m = StopMatcher(["\nUser:"])
    out = [m.feed(p) for p in ["Hello", " there\n", "Us", "er: more"]]
    assert out == ["Hello", " there", "", ""] and m.stopped and m.flush() == ""


def test_held_text_is_released_once_it_cannot_start_a_stop_string():
    m = StopMatcher(["\nUser:"])
    assert m.feed("a\n") == "a"
    assert m.feed("Ux") == "\nUx"
    assert m.feed("b\nUse") == "b"
    assert m.flush() == "\nUse" and not m.stopped  # the stream ended: what was held was just text


def test_the_earliest_of_several_stops_wins_and_no_stops_passes_everything():
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("one\n\ntwo END") == "one" and m.stopped
    m = StopMatcher([])
    assert m.feed("a\nUser:") == "a\nUser:" and m.flush() == ""
    assert set(TURN_STOPS) >= {"\nUser:"}


def test_the_leading_space_before_an_answer_is_dropped_once():
    t = LeadingSpaceTrimmer()
    assert [t.feed(p) for p in [" ", "\n Hi", " there"]] == ["", "Hi", " there"]


# -- the fair queue -----------------------------------------------------------------------------------------
def test_a_free_slot_goes_to_the_user_with_fewest_running_then_least_recently_served():
    q = FairQueue(slots=1)
    a1 = q.join("alice")
    assert a1.granted
    a2, a3 = q.join("alice"), q.join("alice")
    b1, c1 = q.join("bob"), q.join("carol")
    # alice holds the slot: bob and carol, who came after her second and third requests, go first
    assert [q.position(t) for t in (b1, c1, a2, a3)] == [0, 1, 2, 3]
    order = []
    active = a1
    for _ in range(4):
        q.leave(active)
        active = next(t for t in (a2, a3, b1, c1) if t.granted and not t.left)
        order.append(active)
    assert order == [b1, c1, a2, a3]
    q.leave(active)
    assert q.stats() == {"slots": 1, "active": 0, "waiting": 0, "waiting_users": 0}


def test_with_two_slots_a_user_with_many_requests_gets_one_slot_while_others_wait():
    q = FairQueue(slots=2)
    a = [q.join("alice") for _ in range(4)]
    assert [t.granted for t in a] == [True, True, False, False]
    b = q.join("bob")
    assert q.position(b) == 0 and q.position(a[2]) == 1
    q.leave(a[0])
    assert b.granted and not a[2].granted  # alice still runs one; bob ran none
    q.leave(b)
    assert a[2].granted


def test_several_slots_leaving_the_queue_and_a_full_queue():
    q = FairQueue(slots=2, max_waiting=2)
    t = [q.join("u") for _ in range(4)]
    assert [x.granted for x in t] == [True, True, False, False]
    with pytest.raises(QueueFull, match="retry"):
        q.join("v")
    q.leave(t[2])  # gave up waiting
    assert t[2].left and not t[2].granted and q.wait(t[2], 0)  # its waiter wakes up at once
    q.leave(t[0])
    assert t[3].granted and q.stats()["active"] == 2 and q.stats()["waiting"] == 0
    q.leave(t[0])  # twice is harmless
    assert q.stats()["active"] == 2
