"""What goes into a sidecar from a model's answer (clean_caption), and the task definitions."""

from __future__ import annotations

import pytest

from watcher.tasks import INSTRUCTIONS, PROMPT_INSTRUCTION, TASK_KINDS, Task, clean_caption

# -- lead-ins ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "caption"),
    [
        ("The image shows a red barn in snow.", "A red barn in snow."),
        ("This picture depicts two dogs", "Two dogs"),
        ("The photo features a lake", "A lake"),
        ("This photograph displays old tools", "Old tools"),
        ("The image contains three apples", "Three apples"),
        ("This image is of a bridge at night", "A bridge at night"),
        ("The picture captures a storm", "A storm"),
        ("The image shows: a cat", "A cat"),
        ("Answer: a cat", "A cat"),
        ("Caption: a cat", "A cat"),
        ("Prompt: red car, wet street, neon", "Red car, wet street, neon"),
        ("Assistant: a cat", "A cat"),
        ("answer :a cat", "A cat"),
        # Two layers: a role marker, then the sentence opening.
        ("Answer: The image shows a cat", "A cat"),
        ("Assistant: Caption: this image depicts a cat", "A cat"),
    ],
)
def test_lead_ins_are_stripped_and_the_rest_capitalised(answer, caption):
    assert clean_caption(answer) == caption


@pytest.mark.parametrize(
    "answer",
    [
        "THE IMAGE SHOWS a cat",
        "the Image Shows a cat",
        "ANSWER: a cat",
        "tHiS pHoTo DePiCtS a cat",
    ],
)
def test_lead_ins_match_in_any_case(answer):
    assert clean_caption(answer) == "A cat"


def test_only_openings_are_stripped_not_the_same_words_later():
    assert clean_caption("A barn. The image shows snow.") == "A barn. The image shows snow."
    assert clean_caption("Red car, answer: none") == "Red car, answer: none"


def test_a_lead_in_word_that_merely_starts_a_longer_word_is_kept():
    # "is of" must be the words, not "is of" + "fset"/"ten".
    assert clean_caption("The image is offset to the left") == "The image is offset to the left"
    assert clean_caption("The photo is often blurry") == "The photo is often blurry"
    assert clean_caption("The image showstopper: a dress") == "The image showstopper: a dress"
    assert clean_caption("The photographer shows a hat") == "The photographer shows a hat"


def test_text_without_a_lead_in_keeps_its_case():
    # Capitalising is only for text whose opening was cut off: a prompt-style answer
    # that starts lower-case on purpose stays so.
    assert clean_caption("red car, wet street, neon") == "red car, wet street, neon"
    assert clean_caption("iPhone on a desk") == "iPhone on a desk"


# -- never nothing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "the image shows",
        "The image shows.",
        "The image shows:",
        "Answer:",
        "Caption: ...",
        "Answer: The image shows",
        "  assistant:  \n",
    ],
)
def test_an_answer_that_is_all_lead_in_is_kept_as_given(answer):
    assert clean_caption(answer) == " ".join(answer.split())
    assert clean_caption(answer) != ""


def test_an_answer_that_is_all_lead_in_keeps_the_trigger_words():
    assert clean_caption("The image shows", "sks", "photo") == "sks, The image shows, photo"


@pytest.mark.parametrize("answer", ["", " ", "\n\t  \n"])
def test_an_empty_answer_stays_empty(answer):
    # The writer decides what an empty answer means; clean-up does not invent text.
    assert clean_caption(answer) == ""


def test_empty_answer_with_trigger_words_is_just_the_trigger_words():
    assert clean_caption("", "sks", "") == "sks"
    assert clean_caption("  ", "", "style") == "style"


# -- whitespace and lines ----------------------------------------------------------------------


def test_whitespace_is_collapsed_and_trimmed():
    assert clean_caption("  a  cat \t on\u00a0a   mat  ") == "a cat on a mat"


def test_a_multi_line_answer_becomes_one_line():
    answer = "The image shows\n\na cat\r\non a mat.\n\nIt is sunny.\n"
    assert clean_caption(answer) == "A cat on a mat. It is sunny."
    assert "\n" not in clean_caption("line one\nline two\n", "pre", "post")


def test_a_lead_in_on_its_own_line_is_stripped():
    assert clean_caption("Answer:\n  the picture shows\n a cat") == "A cat"


# -- quotes ------------------------------------------------------------------------------------


def test_quotes_are_kept_as_the_model_gave_them():
    # Quotes may be part of the caption (a sign's text); clean-up does not touch them, and
    # a lead-in inside them is not an opening.
    assert clean_caption('"The image shows a cat"') == '"The image shows a cat"'
    assert clean_caption('A sign reading "OPEN"') == 'A sign reading "OPEN"'
    assert clean_caption("Answer: 'a cat'") == "'a cat'"


# -- trigger words -----------------------------------------------------------------------------


def test_prefix_and_suffix_join_with_commas_and_are_trimmed():
    assert clean_caption("a cat", " sks ", " style ") == "sks, a cat, style"
    assert clean_caption("The image shows a cat", "sks") == "sks, A cat"
    assert clean_caption("a cat", "", "style") == "a cat, style"


def test_whitespace_only_trigger_words_add_nothing():
    assert clean_caption("a cat", "  ", "\t") == "a cat"


def test_already_clean_text_is_unchanged():
    # The index stores cleaned text; cleaning it again (captioning.compose) must not change it.
    for text in ("A cat", "red car, wet street", "The image shows", '"quoted"'):
        assert clean_caption(clean_caption(text)) == clean_caption(text)


# -- prompt echo -------------------------------------------------------------------------------


def test_a_role_marker_echoed_from_the_chat_template_is_stripped():
    # Chat-template models sometimes repeat the turn marker before the answer.
    assert clean_caption("ASSISTANT: a red barn") == "A red barn"
    assert clean_caption("assistant:a red barn") == "A red barn"


def test_the_instruction_itself_is_not_mistaken_for_a_lead_in():
    # An echoed instruction is not boilerplate clean-up knows: it is kept, never emptied.
    echoed = INSTRUCTIONS["short"]
    assert clean_caption(echoed) == echoed


# -- task definitions --------------------------------------------------------------------------


def test_every_kind_but_query_has_an_instruction():
    assert set(INSTRUCTIONS) == set(TASK_KINDS) - {"query"}
    assert INSTRUCTIONS["prompt"] == PROMPT_INSTRUCTION
    for kind, text in INSTRUCTIONS.items():
        assert Task(kind).instruction == text
        assert text.strip() == text and text.endswith(".")


def test_a_query_asks_its_question():
    t = Task("query", question="What colour is the car?")
    assert t.instruction == "What colour is the car?"
    assert t.key == "query:What colour is the car?"


def test_keys_are_the_kind_for_fixed_tasks_and_differ_per_question():
    assert [Task(k).key for k in ("prompt", "short", "normal", "long")] == [
        "prompt",
        "short",
        "normal",
        "long",
    ]
    assert Task("query", question="a?").key != Task("query", question="b?").key


def test_tasks_with_equal_fields_are_equal_and_hashable():
    assert Task("short") == Task("short")
    assert len({Task("short"), Task("short"), Task("long")}) == 2
    assert Task("short", max_tokens=120) == Task("short")
    assert Task("short", max_tokens=20) != Task("short")


def test_an_unknown_kind_is_refused_with_the_choices():
    with pytest.raises(ValueError) as e:
        Task("summary")
    assert (
        str(e.value) == "unknown task 'summary'; expected one of prompt, short, normal, long, query"
    )


@pytest.mark.parametrize("question", [None, ""])
def test_a_query_without_a_question_is_refused(question):
    with pytest.raises(ValueError, match="^task 'query' needs a question$"):
        Task("query", question=question)


def test_tasks_are_frozen():
    t = Task("short")
    with pytest.raises(AttributeError):
        t.kind = "long"  # type: ignore[misc]
