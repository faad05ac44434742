import pytest

from edgequant.data import load_task, task_names
from edgequant.errors import DataError


def test_unknown_task_is_a_clear_error():
    with pytest.raises(DataError, match="unknown task 'mmlu'.*hellaswag, arc_easy"):
        load_task("mmlu")


def test_task_names():
    assert task_names() == ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande"]


@pytest.mark.slow
def test_splits_and_prompts_follow_lm_eval():
    sizes = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838,
             "winogrande": 1267}
    for name, n in sizes.items():
        items = load_task(name)
        assert len(items) == n, name
        assert all(0 <= it.gold < len(it.continuations) for it in items)
        assert all(c.startswith(" ") for it in items for c in it.continuations)
    h = load_task("hellaswag")[0]  # "[title]"-free, ctx_b capitalized, activity label first
    assert h.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert h.continuations[3] == " starts pulling up roofing on a roof." and h.gold == 3
    a = load_task("arc_easy")[0]
    assert a.contexts[0].startswith("Question: ") and a.contexts[0].endswith("\nAnswer:")
    assert a.norm_texts is not None and a.continuations[0] == " " + a.norm_texts[0]
    p = load_task("piqa")[0]
    assert p.contexts[0] == "Question: How do I ready a guinea pig cage for it's new " \
        "occupants?\nAnswer:"
    w = load_task("winogrande")[0]  # partial evaluation: one context per option
    assert w.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                          "Sarah was a much better surgeon than Maria so Maria")
    assert w.continuations == (" always got the easier cases.",) * 2 and w.gold == 1
    assert w.norm_texts is None


@pytest.mark.slow
def test_limit_is_a_seeded_fixed_subset():
    a = load_task("piqa", limit=50)
    assert len(a) == 50 and a == load_task("piqa", limit=50)
    ids = [int(x.doc_id) for x in a]
    assert ids == sorted(ids) and ids != list(range(50))
    assert a != load_task("piqa", limit=50, seed=7)
    with pytest.raises(DataError):
        load_task("piqa", limit=0)
