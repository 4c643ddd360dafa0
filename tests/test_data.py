"""Data sources, splits and response-only labels."""
import json

import pytest
from transformers import AutoTokenizer

from rankwise.config import ConfigError
from rankwise.data import IGNORE, DataError, check_data, collate, encode, load_splits
from rankwise.data.sources import split
from rankwise.data.stdlib_docstrings import extract


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_builtin_dataset_is_deterministic_and_disjoint():
    a, b = load_splits("stdlib-docstrings"), load_splits("stdlib-docstrings")
    assert len(a.tiny) == 32 and len(a.test) == 192 and len(a.validation) == 64 and len(a.train) > 3000
    assert a.train[:5] == b.train[:5] and a.test == b.test and a.validation == b.validation
    prompts = lambda xs: {x["messages"][0]["content"] for x in xs}  # noqa: E731
    assert not prompts(a.train) & prompts(a.test) and not prompts(a.tiny) & prompts(a.test)
    held = [a.train, a.tiny, a.test, a.validation]  # selection never sees what results are reported on
    assert all(not prompts(x) & prompts(y) for i, x in enumerate(held) for y in held[i + 1:])


def test_docstring_is_removed_from_prompt():
    for pair in extract()[:200]:
        assert pair["response"] not in pair["prompt"]


def test_labels_cover_only_the_response(tok):
    ex = {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello there"}]}
    item = encode(tok, ex)
    learned = [t for t in item["labels"] if t != IGNORE]
    assert tok.decode(learned).startswith("hello there")
    assert "say hi" not in tok.decode(learned)
    assert len(item["labels"]) == len(item["input_ids"])


def test_multi_turn_learns_every_assistant_turn(tok):
    ex = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
                       {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]}
    text = tok.decode([t for t in encode(tok, ex)["labels"] if t != IGNORE])
    assert "first" in text and "second" in text and "b" not in text.replace("<|im_end|>", "")


def test_jsonl_prompt_response_and_messages(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(30)]
    rows += [{"messages": [{"role": "user", "content": f"m{i}"}, {"role": "assistant", "content": "r"}]}
             for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = load_splits(str(path))
    assert len(s.train) + len(s.tiny) + len(s.test) + len(s.validation) == 60 and len(s.validation) == 1


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "response": ', "d.jsonl:3: malformed JSON"),
    ('{"question": "x"}', "d.jsonl:3: expected keys"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "d.jsonl:3: 'messages' has no assistant turn"),
    ('[1, 2]', "d.jsonl:3: expected a JSON object"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "d.jsonl:3: 'messages' starts with an assistant"),
    ('{"prompt": "\\ud800", "response": "x"}', "d.jsonl:3: text holds an unpaired surrogate"),
])
def test_malformed_jsonl_names_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"})
    path.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(DataError, match=message):
        load_splits(str(path))


def test_jsonl_with_bom_and_crlf_loads_and_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [json.dumps({"prompt": f"q{i}", "response": "ä"}, ensure_ascii=False).encode() for i in range(20)]
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(rows))  # as a Windows editor saves it
    assert sum(len(part) for part in vars(load_splits(str(path))).values()) == 20
    path.write_bytes(b"\n".join(rows[:2] + [b"\xff" + rows[2]]))
    with pytest.raises(DataError, match="d.jsonl:3: not UTF-8 text"):
        load_splits(str(path))


def test_unusable_data_path_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset path cannot be used"):
        check_data("x" * 300 + ".jsonl")  # longer than a file name may be


def test_hf_datasets_directory(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)])
    test = datasets.Dataset.from_list([{"prompt": f"t{i}", "response": "x"} for i in range(5)])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "ds")
    s = load_splits(str(tmp_path / "ds"))
    assert len(s.test) == 5 and len(s.tiny) + len(s.train) == 40 and s.validation == []
    datasets.DatasetDict({"train": train, "test": test, "validation": test.select(range(2))}).save_to_disk(
        tmp_path / "ds2")
    s = load_splits(str(tmp_path / "ds2"))
    assert len(s.test) == 5 and [r["messages"][0]["content"] for r in s.validation] == ["t0", "t1"]


def test_too_few_examples():
    with pytest.raises(DataError, match="only 2 examples"):
        split([{"messages": []}, {"messages": [1]}])


def test_collate_pads_and_masks(tok):
    items = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [IGNORE]}]
    batch = collate(items, pad_id=0, multiple=4)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE] * 4


def test_pack_first_fit_longest_first_and_refuses_what_cannot_fit():
    from rankwise.data import pack

    rows = pack([5, 3, 8, 2, 6], capacity=10)
    assert rows == [[2, 3], [4, 1], [0]]  # 8+2, 6+3, 5: no row over capacity, every item once
    with pytest.raises(ValueError):
        pack([11], capacity=10)


def test_collate_packed_restarts_positions_and_drops_each_first_label():
    from rankwise.data import IGNORE, collate_packed

    items = [{"input_ids": [1, 2, 3], "labels": [7, 2, 3]}, {"input_ids": [4, 5], "labels": [9, 5]},
             {"input_ids": [6, 7, 8, 9], "labels": [IGNORE, IGNORE, 8, 9]}]
    batch = collate_packed(items, pad_id=0, capacity=7, multiple=4)
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 1, 2, 3, 0], [4, 5, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    # a packed item's first label would be predicted from the previous item's last token: dropped
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 8, 9, IGNORE, 2, 3, IGNORE], [IGNORE, 5] + [IGNORE] * 6]
    assert batch["attention_mask"].sum() == 9
