"""rankwise inside other people's loops: LoFT, LoRA-Pre (Adam and Muon) and LoRA-FA in a transformers
Trainer, Fast Forward in TRL's SFTTrainer. Each runs a few steps on the tiny model; the optimizers' runs
must equal a hand-written loop over the same batches, so a Trainer that bypassed our step would fail."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments,
                          get_scheduler)

from rankwise.data import collate, encode_all, load_splits
from rankwise.lorafa import to_lora_fa
from rankwise.optim import LoFT, LoRAPreAdam, LoRAPreMuon

STEPS = 4


@pytest.fixture(scope="module")
def data(tiny_model_dir):
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = load_splits("stdlib-docstrings")
    return tok, splits, encode_all(tok, splits.train[:4 * STEPS], 128)


def _peft_model(tiny_model_dir):
    torch.manual_seed(0)  # PEFT draws A from the global RNG
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


class _SeedBeforeStep(TrainerCallback):
    """LoRA-Pre draws its first factors from the global RNG inside step(); seed it there, as the hand loop does."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        torch.manual_seed(state.global_step)


def _train(model, optimizer, tok, rows, out, **overrides) -> list[dict]:
    """Trainer with `optimizer` (None: its own AdamW) and the default linear schedule, STEPS steps of 4
    rows; returns the batches it trained on, in order."""
    drawn = []

    def collator(items):
        drawn.append(collate(items, tok.pad_token_id))
        return drawn[-1]

    args = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, report_to=[],
                save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=TrainingArguments(**{**args, **overrides}), train_dataset=rows,
                      data_collator=collator, optimizers=(optimizer, None), callbacks=[_SeedBeforeStep()])
    trainer.train()
    assert trainer.state.global_step == STEPS
    return drawn[:STEPS]  # the loader may have drawn one batch ahead


def _hand_loop(model, optimizer, batches, clip: float = 0.0) -> None:
    """The loop a user would write: backward, (clip), step, the same linear schedule Trainer builds."""
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    model.train()
    for step, batch in enumerate(batches):
        model(**batch).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        torch.manual_seed(step)
        optimizer.step()
        schedule.step()
        model.zero_grad()


@torch.no_grad()
def _mean_loss(model, batches) -> float:
    model.eval()
    return sum(float(model(**b).loss) for b in batches) / len(batches)


def _assert_same(trained, by_hand, atol=1e-6):
    for (name, p), q in zip(trained.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ---- LoFT on a PEFT model ---------------------------------------------------------------------------
def test_loft_in_trainer_equals_a_hand_loop(tiny_model_dir, data, tmp_path):
    tok, _, rows = data
    model = _peft_model(tiny_model_dir)
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    # LoFT clips its projected gradients itself (at 0.3 both that and a raw clip would act on these
    # batches), so Trainer must not clip the raw ones first
    optimizer = LoFT.from_peft_model(model, lr=1e-2, max_grad_norm=0.3)
    batches = _train(model, optimizer, tok, rows, tmp_path, max_grad_norm=0.0)
    _hand_loop(twin, LoFT.from_peft_model(twin, lr=1e-2, max_grad_norm=0.3), batches)
    _assert_same(model, twin)

    moved = {n for (n, p), q in zip(model.named_parameters(), start.parameters()) if not torch.equal(p, q)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable and any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["step"] == STEPS
    assert _mean_loss(model, batches) < _mean_loss(start, batches)


def test_loft_in_trainer_resumes_exactly(tiny_model_dir, data, tmp_path):
    """Trainer saves and restores LoFT's state_dict (moments, alternation) with its checkpoints."""
    tok, _, rows = data

    def run(resume=None):
        model = _peft_model(tiny_model_dir)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS,
                                 save_steps=2, max_grad_norm=0.0, report_to=[], logging_strategy="no",
                                 use_cpu=True, disable_tqdm=True, seed=0)
        Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda r: collate(r, tok.pad_token_id),
                optimizers=(LoFT.from_peft_model(model, lr=1e-2, max_grad_norm=0.3), None)
                ).train(resume_from_checkpoint=resume)
        return model

    whole = run()
    _assert_same(run(str(tmp_path / "checkpoint-2")), whole)


# ---- LoRA-Pre: full-weight training with low-rank optimizer state -----------------------------------
@pytest.mark.parametrize("cls", [LoRAPreAdam, LoRAPreMuon])
def test_lora_pre_in_trainer_equals_a_hand_loop(tiny_model_dir, data, tmp_path, cls):
    tok, _, rows = data
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = cls.for_model(model, rank=2, lr=3e-3)
    batches = _train(model, optimizer, tok, rows, tmp_path)  # Trainer's default clipping at 1.0 applies
    _hand_loop(twin, cls.for_model(twin, rank=2, lr=3e-3), batches, clip=1.0)
    _assert_same(model, twin)

    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[q_proj]["m_A"].shape == (2, q_proj.shape[1])  # low-rank state, not AdamW's
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))
    assert _mean_loss(model, batches) < _mean_loss(start, batches)


# ---- LoRA-FA: Trainer's own AdamW on the corrected gradient ----------------------------------------
def test_lora_fa_in_trainer_trains_b_on_the_corrected_gradient(tiny_model_dir, data, tmp_path):
    tok, _, rows = data
    plain = _peft_model(tiny_model_dir)
    model = to_lora_fa(copy.deepcopy(plain))
    start = copy.deepcopy(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    B = layer.lora_B["default"].weight
    first = []
    B.register_hook(lambda g: first.append(g.clone()) if not first else None)  # before Trainer clips

    batches = _train(model, None, tok, rows, tmp_path)
    # g̃_B = ∂L/∂B · (A Aᵀ + δI)⁻¹ / s², with ∂L/∂B from the unconverted PEFT model on the same batch
    plain.train()
    plain(**batches[0]).loss.backward()
    plain_layer = plain.base_model.model.model.layers[0].self_attn.q_proj
    expected = plain_layer.lora_B["default"].weight.grad @ layer.fa_gram_inv / layer.scaling["default"] ** 2
    torch.testing.assert_close(first[0], expected, rtol=1e-4, atol=1e-7)

    for (name, p), q in zip(model.named_parameters(), start.parameters()):
        assert torch.equal(p, q) != ("lora_B" in name), name  # only B moves: A and the base stay
    assert _mean_loss(model, batches) < _mean_loss(start, batches)


# ---- Fast Forward in TRL's SFTTrainer ---------------------------------------------------------------
def test_fast_forward_in_sft_trainer(tiny_model_dir, data, tmp_path):
    import trl  # the test extra
    from datasets import Dataset

    from rankwise.fastforward import FastForwardCallback

    tok, splits, _ = data
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tok,
        args=trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, max_length=128,
                           learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                           logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0),
        train_dataset=Dataset.from_list(splits.train[:24]), eval_dataset=Dataset.from_list(splits.tiny[:8]),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    ff = FastForwardCallback(trainer.eval_dataset, interval=2, burn_in=2, backoff=1.0)  # tokenized by TRL
    trainer.add_callback(ff)
    trainer.train()

    assert [r["step"] for r in ff.records] == [2, 4, 6]
    assert all(r["loss_after"] <= r["loss_before"] and r["evals"] >= 2 for r in ff.records)
    assert any(r["accepted"] > 0 for r in ff.records)
    assert [e["step"] for e in trainer.state.log_history if "ff_accepted" in e] == [2, 4, 6]
