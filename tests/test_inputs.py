"""User texts checked into field tuples: the engine's and the exported loader's one rule."""

import pytest

from sharcs_jax.data.inputs import text_rows


def test_a_lone_string_is_one_field_and_sequences_become_tuples():
  assert text_rows(["a", ["b"]], ("sentence",), "sst2") == [("a",), ("b",)]
  assert text_rows([["q1", "q2"]], ("question1", "question2"), "qqp") == [("q1", "q2")]


@pytest.mark.parametrize("texts, message", [
    (["one string"], r"input 0 has 1 field\(s\) \('one string',\); qqp takes 2 string\(s\): "
                     r"question1, question2"),
    ([("a", "b"), ("a", None)], r"input 1 has 2 field"),
])
def test_a_wrong_input_is_named(texts, message):
  with pytest.raises(ValueError, match=message):
    text_rows(texts, ("question1", "question2"), "qqp")
