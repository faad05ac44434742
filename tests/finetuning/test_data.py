"""Training data: disjoint from evaluation text, chat rendering with loss on responses only,
and bad input named precisely."""

from __future__ import annotations

import json

import pytest
import torch

from edgequant.data.tokens import corpus_tokens
from edgequant.errors import DataError
from edgequant.eval.perplexity import make_windows
from edgequant.finetuning.data import (
    IGNORE,
    ChatTemplate,
    DataConfig,
    build_data,
    read_chat_file,
)


def test_wiki_training_windows_never_touch_the_evaluation_text(smol_tokenizer):
    data = build_data(DataConfig("wiki", seq_len=64, batch_size=4), smol_tokenizer)
    stream = corpus_tokens("wiki", smol_tokenizer)
    half = stream.numel() // 2
    assert torch.equal(data.windows[:, 1:].reshape(-1), stream[half:half + data.n * 63])
    assert (data.windows[:, 0] == smol_tokenizer.bos_token_id).all()
    # evaluation's default windows (8,192 tokens, ctx 512) come from the first half
    ev = make_windows(stream, 512, smol_tokenizer.bos_token_id, 8192)
    assert ev.tokens.numel() <= half
    b = data.batch(3)
    assert b["input_ids"].shape == (4, 64) and torch.equal(b["input_ids"],
                                                          data.batch(3)["input_ids"])


def test_text_file_and_too_short_text(tmp_path, smol_tokenizer):
    p = tmp_path / "t.txt"
    p.write_text("hello world " * 200)
    d = build_data(DataConfig(str(p), seq_len=32, batch_size=2), smol_tokenizer)
    assert d.n >= 10 and d.describe()["held_out"].startswith("the whole text file")
    p.write_text("too short")
    with pytest.raises(DataError, match="fewer than one window"):
        build_data(DataConfig(str(p), seq_len=32), smol_tokenizer)


def test_chat_template_masks_everything_but_the_responses(smol_tokenizer):
    msgs = [{"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Green."}]
    tpl = ChatTemplate(smol_tokenizer)
    assert tpl.name == "tokenizer"
    ids, labels = tpl.encode(msgs)
    full = smol_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert smol_tokenizer.decode(ids) == full
    learned = smol_tokenizer.decode([t for t in labels if t != IGNORE])
    assert learned == "Blue.<|im_end|>\nGreen.<|im_end|>\n"


def test_chatml_fallback_without_a_template(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    tpl = ChatTemplate(tok)
    ids, labels = tpl.encode([{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}])
    assert tpl.name == "chatml (fallback)"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello" \
                              "<|im_end|>\n"


def test_alpaca_messages_and_sharegpt_records(tmp_path, smol_tokenizer):
    p = tmp_path / "d.jsonl"
    rows = [{"instruction": "Add", "input": "2+2", "output": "4"},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hey " * 100}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs = read_chat_file(p)
    assert convs[0] == [{"role": "user", "content": "Add\n\n2+2"},
                        {"role": "assistant", "content": "4"}]
    data = build_data(DataConfig(str(p), seq_len=40, batch_size=3), smol_tokenizer)
    b = data.batch(0)
    assert b["input_ids"].shape[0] == 3 and b["input_ids"].shape[1] <= 40
    assert ((b["labels"] != IGNORE) <= (b["attention_mask"] == 1)).all()
    assert data.stats()["truncated"] == 1                   # the long answer, cut at 40


@pytest.mark.parametrize("text, match", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n', r"d\.jsonl:2: not "
     "valid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"prompt": "x"}\n', r"d\.jsonl:2: expected "
     "'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"d\.jsonl:1: unknown role"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', r"d\.jsonl:1: .*no assistant"),
    ("\n\n", r"contains no examples"),
])
def test_bad_chat_files_name_the_line(tmp_path, text, match):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        read_chat_file(p)


def test_json_list_errors_name_the_item(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"x": 1}]))
    with pytest.raises(DataError, match=r"d\.json: item 1: expected"):
        read_chat_file(p)
    p.write_text("[{")
    with pytest.raises(DataError, match=r"d\.json:1: not valid JSON"):
        read_chat_file(p)
