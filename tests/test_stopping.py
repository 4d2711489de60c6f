"""model/text/stopping.py: where a generated row ends, on a toy vocabulary whose texts are written out by hand."""

from __future__ import annotations

import pytest
import torch

from model.generate.base import StopByRule
from model.text.stopping import RowEnds, StopRule, ended_on_device

EOS = 9
PIECES = {1: "a", 2: "\n", 3: "#", 4: "##", 5: "\n###", 6: " ###", 7: "b", 8: "###x", EOS: ""}
# stop id sequences: (6,) stands for "▁###", (5,) for "\n###" as the tokenizer spells it
RULE = StopRule(EOS, ((6,), (5,)), lambda ids: "".join(PIECES[i] for i in ids))


@pytest.mark.parametrize(
    ("ids", "keep"),
    [
        ([1, 7, 1], None),  # "aba": no end
        ([1, 3, 3, 3], None),  # "a###": "###" without the newline is no end
        ([1, EOS, 7], 1),  # EOS at 1, dropped
        ([1, 6, 7], 2),  # the stop id 6 at 1, kept
        ([1, 5, 7], 2),  # the stop sequence (5,) at 1, kept
        ([1, 2, 3, 4, 7], 4),  # "a" "\n" "#" "##": the text "\n###" completes at id 3
        ([1, 2, 8], 3),  # "a" "\n" "###x": the text completes inside id 2
        ([2, 3, 4, 1, EOS], 3),  # the text ends at id 2, before the EOS at 4
        ([2, 4, 6, 7], 3),  # "\n##" + " ###": the stop id 6 at 2 comes first (the text never forms)
    ],
)
def test_where_a_row_ends(ids, keep):
    assert RULE.end(ids) == keep
    assert RULE.cut(ids) == (ids if keep is None else ids[:keep])


def test_a_check_from_since_finds_an_end_that_straddles_it():
    """ids[:2] ("a\\n") were found not to end the row; the text completes with id 3."""
    assert RULE.end([1, 2, 3, 4, 7], since=2) == 4
    assert RULE.end([1, 2, 3, 1, 7], since=2) is None


def test_finish_reason():
    assert RULE.finish_reason([1, 1], 2) == "length"  # ran to its budget
    assert RULE.finish_reason([1, 5], 2) == "stop"  # its last id is a stop
    assert RULE.finish_reason([1, 2, 3, 4], 4) == "stop"  # its text ends at the budget
    assert RULE.finish_reason([1], 2) == "stop"  # short of its budget: an EOS was cut off


def test_rows_end_independently_as_their_ids_arrive():
    """Two rows, one id at a time: "a\\n###" ends at the 4th id; "aaaa" never."""
    ends = RowEnds(RULE, 2)
    seen = [list(ends.add([[a], [b]])) for a, b in zip([1, 2, 3, 4], [1, 1, 1, 1], strict=True)]
    assert seen == [[False, False], [False, False], [False, False], [True, False]]
    criteria = StopByRule(RULE)  # transformers' criteria: each call brings one more column
    columns = torch.tensor([[1, 1], [2, 1], [3, 1], [4, 1]])
    flags = [criteria(columns[: n + 1].T, None).tolist() for n in range(4)]
    assert flags[-1] == [True, False] and flags[-2] == [False, False]


def test_the_id_part_on_the_device():
    """Rows "a ###", "a EOS", "aaa" (its budget 3), "\\n#" (not yet an end)."""
    out = torch.tensor([[1, 6, 0, 0], [1, EOS, 0, 0], [1, 1, 1, 0], [2, 3, 0, 0]])
    count, budget = torch.tensor([2, 2, 3, 2]), torch.tensor([4, 4, 3, 4])
    stops = [torch.tensor(s) for s in RULE.stops]
    assert ended_on_device(out, count, budget, EOS, stops).tolist() == [True, True, True, False]
