"""The task metric: ROUGE-L F1 against hand-computed values, its mean over generated replies, in the recipe."""
import json

import pytest
import torch

from rankwise.recipes.task_metric import lcs_length, mean_rouge_l, rouge_l


def test_lcs_counts_an_in_order_subsequence_not_a_substring():
    assert lcs_length("a b c d".split(), "a c b d".split()) == 3
    assert lcs_length("x y".split(), "a b".split()) == 0
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_matches_a_hand_computed_f1():
    # 4 common words in order; precision 4/5, recall 4/6: F1 = 2·0.8·0.667 / 1.467 = 8/11
    assert rouge_l("Return the sum of x", "Return the sum of two numbers.") == pytest.approx(8 / 11)
    assert rouge_l("Same Words, here.", "same words here") == 1.0  # case and punctuation do not count
    assert rouge_l("", "anything") == 0.0 and rouge_l("unrelated", "other text") == 0.0


def test_mean_rouge_l_scores_each_reply_against_its_own_reference(monkeypatch):
    import rankwise.generate

    examples = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": ref}]}
                for i, ref in enumerate(["Open the file.", "Close the door now."])]
    replies = {"q0": "Open the file.", "q1": "close it"}  # 1.0, then LCS 1 of 2 and 4 words: F1 1/3
    monkeypatch.setattr(rankwise.generate, "generate_batch",
                        lambda model, tok, chats, *a: [replies[messages[-1]["content"]] for messages in chats])
    done = []
    assert mean_rouge_l(None, None, examples, batch_size=1, progress=done.append) == pytest.approx((1 + 1 / 3) / 2)
    assert done == [1, 1]


def _greedy_reference(model, tok, messages, new_tokens):
    """Greedy decoding written out: one chat, no padding, no cache, no generate(); the argmax of a full
    forward per new token until an end-of-sequence token, decoded without special tokens."""
    from rankwise.data import prompt_ids

    ids, new = torch.tensor([prompt_ids(tok, messages)]), []
    stops = model.generation_config.eos_token_id
    stops = set(stops) if isinstance(stops, list) else {stops}
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token in stops:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_batched_generation_gives_each_prompt_its_unbatched_reply(tiny_model_dir):
    from rankwise.generate import generate, generate_batch
    from rankwise.models import load_model, load_tokenizer

    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as initialised, the tiny model answers only newlines (an empty reply after strip)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    chats = [[{"role": "user", "content": text}] for text in ("def f(x): return x", "a much longer prompt " * 6)]
    replies = generate_batch(model, tok, chats, 12)
    assert replies == [generate(model, tok, chat, 12) for chat in chats]
    # generate() is generate_batch of one chat: the independent check is greedy decoding written out
    assert replies == [_greedy_reference(model, tok, chat, 12) for chat in chats]
    assert all(replies) and replies[0] != replies[1]


def test_the_recipe_reports_and_logs_rouge_l_when_asked(tiny_cfg):
    from rankwise.recipes.train import train

    summary = train(tiny_cfg(steps=2, eval_every=0, eval_generate=3), say=lambda *a: None)
    assert 0.0 <= summary["rouge_l"] <= 1.0
    records = [json.loads(line) for line in open(f"{tiny_cfg().out}/metrics.jsonl")]
    assert [r["generated"] for r in records if "rouge_l" in r] == [3]
    assert train(tiny_cfg(steps=1, eval_every=0, overwrite=True), say=lambda *a: None)["rouge_l"] is None  # off by default


def test_a_negative_eval_generate_is_refused_before_loading(tiny_cfg):
    from rankwise.config import ConfigError
    from rankwise.validate import validate

    with pytest.raises(ConfigError, match="eval_generate must be >= 0"):
        validate(tiny_cfg(eval_generate=-1))
