"""LoRA-Pre optimizers: the factor step is the closed-form Newton step with damping relative to its Gram
matrix, the low-rank momentum is an exact EMA inside its subspace at any gradient scale, the parameter
update is the spec's (checked against a plain full-matrix reference), state is 2r(p+q) / r(p+q) per matrix,
and a resumed optimizer continues exactly."""
from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch

from rankwise.config import ConfigError
from rankwise.optim import LoRAPreAdam, LoRAPreMuon, get_optimizer, optimizer_state_bytes
from rankwise.optim.lora_pre import advance_factors, newton_step_A, newton_step_B
from rankwise.optim.lora_pre_muon import newton_schulz
from rankwise.tiny import tiny_llama

torch.manual_seed(0)


def _damping(gram, delta):
    """The spec's delta I, relative: delta times the mean eigenvalue of the Gram matrix it damps."""
    return delta * torch.trace(gram) / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)


def test_factor_update_is_the_damped_closed_form_newton_step():
    p, q, r, gamma, delta = 9, 7, 3, 0.3, 1e-3
    B, A, g = (torch.randn(p, r, dtype=torch.float64), torch.randn(r, q, dtype=torch.float64),
               torch.randn(p, q, dtype=torch.float64))
    eye = torch.eye(r, dtype=torch.float64)
    B_ref = (1 - gamma) * B + gamma * g @ A.T @ torch.linalg.inv(A @ A.T + _damping(A @ A.T, delta))
    A_ref = (1 - gamma) * A + gamma * torch.linalg.inv(B_ref.T @ B_ref + _damping(B_ref.T @ B_ref, delta)) @ B_ref.T @ g
    B1, A1 = B.clone(), A.clone()
    newton_step_B(B1, A1, g, gamma, delta)
    torch.testing.assert_close(B1, B_ref)
    newton_step_A(B1, A1, g, gamma, delta)
    torch.testing.assert_close(A1, A_ref)

    # the full advance also re-orthonormalises A's rows, leaving the product unchanged
    B2, A2 = B.clone(), A.clone()
    advance_factors(B2, A2, g, gamma, delta)
    torch.testing.assert_close(B2 @ A2, B_ref @ A_ref)
    torch.testing.assert_close(A2 @ A2.T, eye)

    # gamma = 1: each factor lands on the minimiser of 1/2||BA - g||^2 + d/2||factor||^2 (zero gradient),
    # d = delta * mean eigenvalue of the other factor's Gram matrix
    B3, A3 = B.clone(), A.clone()
    newton_step_B(B3, A3, g, 1.0, delta)
    Bv, d = B3.clone().requires_grad_(True), delta * float(torch.trace(A3 @ A3.T)) / r
    (0.5 * (Bv @ A3 - g).square().sum() + 0.5 * d * Bv.square().sum()).backward()
    assert Bv.grad.abs().max() < 1e-9
    newton_step_A(B3, A3, g, 1.0, delta)
    Av, d = A3.clone().requires_grad_(True), delta * float(torch.trace(B3.T @ B3)) / r
    (0.5 * (B3 @ Av - g).square().sum() + 0.5 * d * Av.square().sum()).backward()
    assert Av.grad.abs().max() < 1e-9

    # scale-free: g and B scaled by c give B scaled by c and the same A (an absolute delta would not)
    c = 1e-4
    B4, A4, B5, A5 = B.clone(), A.clone(), c * B, A.clone()
    advance_factors(B4, A4, g, gamma, delta)
    advance_factors(B5, A5, c * g, gamma, delta)
    torch.testing.assert_close(B5, c * B4, rtol=1e-10, atol=0)
    torch.testing.assert_close(A5, A4, rtol=1e-10, atol=1e-12)


def _one_matrix_optimizer(cls, p=24, q=16, r=3, **kw):
    weight = torch.nn.Parameter(torch.zeros(p, q))
    opt = cls([{"params": [weight], "rank": r}], lr=0.0, delta=1e-10, **kw)
    return weight, opt


def _coordinates(r, dtype=torch.float32):
    """Random r x r gradient coordinates whose EMA stays far from singular (an EMA that passes through a
    rank-deficient matrix cannot be factored exactly there; the damped solve then drops that direction)."""
    return torch.diag(torch.arange(1, r + 1, dtype=dtype)) + 0.3 * torch.randn(r, r, dtype=dtype)


def test_low_rank_first_moment_is_the_exact_ema_inside_a_fixed_subspace():
    p, q, r, beta1 = 24, 16, 3, 0.9
    U, _ = torch.linalg.qr(torch.randn(p, r, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(q, r, dtype=torch.float64))
    weight, opt = _one_matrix_optimizer(LoRAPreAdam, p, q, r, betas=(beta1, 0.95))
    weight.grad = torch.zeros(p, q)
    opt.step()  # creates the state; lr=0 leaves the weight alone
    state = opt.state[weight]
    # factors spanning the gradients' column and row spaces (any invertible mixing inside them)
    state["m_B"] = (U @ _coordinates(r, torch.float64)).float()
    state["m_A"] = (_coordinates(r, torch.float64) @ V.T).float()
    ema = (state["m_B"] @ state["m_A"]).double()
    for _ in range(40):
        g = U @ _coordinates(r, torch.float64) @ V.T
        weight.grad = g.float()
        opt.step()
        ema = beta1 * ema + (1 - beta1) * g
        product = (state["m_B"] @ state["m_A"]).double()
        assert (product - ema).norm() / ema.norm() < 2e-5  # fp32 rounding only


def test_low_rank_first_moment_converges_to_the_ema_from_its_initialisation():
    p, q, r, beta1 = 24, 16, 3, 0.9
    U, V = torch.randn(p, r), torch.randn(q, r)
    weight, opt = _one_matrix_optimizer(LoRAPreAdam, p, q, r, betas=(beta1, 0.95))
    ema, errors = torch.zeros(p, q), []
    for _ in range(150):
        g = U @ _coordinates(r) @ V.T
        weight.grad = g
        opt.step()
        ema = beta1 * ema + (1 - beta1) * g
        state = opt.state[weight]
        errors.append(float((state["m_B"] @ state["m_A"] - ema).norm() / ema.norm()))
    assert errors[-1] < 1e-4 < 1e-2 < errors[0]


@functools.cache
def _tracking_errors(cls, scale, steps=150):
    """Relative error of the factored momentum against the true one after each of `steps` steps with the
    default delta, gradients scale * U c V^T (U, V orthonormal); the draws are the same at every scale."""
    p, q, r = 24, 16, 3
    gen = torch.Generator().manual_seed(0)
    U, V = torch.linalg.qr(torch.randn(p, r, generator=gen))[0], torch.linalg.qr(torch.randn(q, r, generator=gen))[0]
    weight = torch.nn.Parameter(torch.zeros(p, q))
    torch.manual_seed(0)  # the factors' initial draw
    opt = cls([{"params": [weight], "rank": r}], lr=0.0)
    momentum, errors = torch.zeros(p, q), []
    for _ in range(steps):
        g = scale * (U @ (torch.diag(torch.arange(1.0, r + 1)) + 0.3 * torch.randn(r, r, generator=gen)) @ V.T)
        weight.grad = g
        opt.step()
        # Adam's EMA, or Muon's heavy-ball sum, which its factors track through g / (1 - mu)
        momentum = 0.9 * momentum + 0.1 * g if cls is LoRAPreAdam else 0.95 * momentum + g
        state = opt.state[weight]
        errors.append(float((state["m_B"] @ state["m_A"] - momentum).norm() / momentum.norm()))
    return tuple(errors)


@pytest.mark.parametrize("cls, floor", [(LoRAPreAdam, 1e-4), (LoRAPreMuon, 3e-3)])
@pytest.mark.parametrize("scale", [1e-2, 3e-3, 1e-3, 1e-4])
def test_momentum_tracks_the_ema_alike_at_small_gradient_scales(cls, floor, scale):
    # an absolute delta = 1e-6 ended Adam's run at 1.6e-3, 1.8e-2, 0.13, 0.87 for these scales (2.7e-5 at 1)
    unit, small = _tracking_errors(cls, 1.0), _tracking_errors(cls, scale)
    assert small[-1] < floor and unit[-1] < floor
    assert max(abs(a - b) / a for a, b in zip(unit, small)) < 0.05  # the same path, not just the same end


# ---- the parameter update against a plain full-matrix reference (the spec's equations) ---------------
def _newton_schulz_reference(G, steps=5):
    """Muon's quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X from X = G / ||G||_F, any shape."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)
    for _ in range(steps):
        S = X @ X.T
        X = a * X + (b * S + c * S @ S) @ X
    return X


class _PlainReference:
    """LoRA-Pre's update with full p x q moments in float64: Adam (m, and u = the EMA of |g| that v_B v_A
    track, v = beta2 u^2 + (1 - beta2) g^2) or Muon (heavy-ball m, Nesterov, Newton-Schulz, RMS match)."""

    def __init__(self, cls, shape, lr, kw):
        self.adam, self.lr, self.kw, self.t = cls is LoRAPreAdam, lr, kw, 0
        self.m, self.u = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)

    def step(self, theta, g):
        kw, self.t = self.kw, self.t + 1
        if self.adam:
            beta1, beta2 = kw.get("betas", (0.9, 0.95))
            v = beta2 * self.u ** 2 + (1 - beta2) * g ** 2
            self.m = beta1 * self.m + (1 - beta1) * g
            self.u = math.sqrt(beta2) * self.u + (1 - math.sqrt(beta2)) * g.abs()
            update = (self.m / (1 - beta1 ** self.t)) / ((v / (1 - beta2 ** self.t)).sqrt() + kw.get("eps", 1e-8))
        else:
            mu = kw.get("momentum", 0.95)
            self.m = mu * self.m + g
            direction = g + mu * self.m if kw.get("nesterov", True) else self.m
            update = 0.2 * math.sqrt(max(g.shape)) * _newton_schulz_reference(direction, kw.get("ns_steps", 5))
        return theta * (1 - self.lr * kw.get("weight_decay", 0.0)) - self.lr * kw.get("scale", 1.0) * update


UPDATE_CASES = [(LoRAPreAdam, {"weight_decay": 0.1, "scale": 0.5}), (LoRAPreAdam, {"betas": (0.8, 0.9)}),
                (LoRAPreMuon, {"weight_decay": 0.1, "scale": 0.5}), (LoRAPreMuon, {"nesterov": False, "momentum": 0.9})]


@pytest.mark.parametrize("cls, kw", UPDATE_CASES)
def test_update_at_full_rank_is_the_plain_full_matrix_update(cls, kw, monkeypatch):
    import rankwise.optim.lora_pre as lora_pre

    # rank = n on an n x n weight: both factors square and invertible, so the factored momentum is the true
    # one and every step must equal the plain update (the optimizer itself gives rank >= min(p, q) to AdamW)
    monkeypatch.setattr(lora_pre, "_low_rank", lambda p, group: group["rank"] > 0 and p.ndim == 2)
    n, lr = 6, 1e-2
    gen = torch.Generator().manual_seed(4)
    center = 2 * torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    weight = torch.nn.Parameter(torch.randn(n, n, generator=gen))
    # delta negligible: this pins the update; the damping has its own tests
    opt = cls([{"params": [weight], "rank": n}], lr=lr, delta=1e-10, **kw)
    reference = _PlainReference(cls, (n, n), lr, kw)
    tolerance = (2e-3 if cls is LoRAPreAdam else 2e-4) * lr * kw.get("scale", 1.0)  # fp32 factors
    for _ in range(8):
        g = center + torch.randn(n, n, generator=gen, dtype=torch.float64)  # entries change sign step to step
        expected = reference.step(weight.detach().double(), g)
        weight.grad = g.float()
        opt.step()
        assert (weight.detach().double() - expected).abs().max() < tolerance


@pytest.mark.parametrize("cls, kw", UPDATE_CASES)
@pytest.mark.parametrize("shape", [(10, 4), (4, 10)])
def test_first_step_on_a_non_square_weight_is_the_plain_update(cls, kw, shape):
    # the history starts at zero, so the first step is exact at any rank: it pins the tall and wide
    # Newton-Schulz paths and the 0.2 sqrt(max(p, q)) RMS match that a square weight cannot tell apart
    gen = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter(torch.randn(shape, generator=gen))
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    opt = cls([{"params": [weight], "rank": 2}], lr=1e-2, **kw)
    expected = _PlainReference(cls, shape, 1e-2, kw).step(weight.detach().double(), g)
    weight.grad = g.float()
    opt.step()
    torch.testing.assert_close(weight.detach().double(), expected, rtol=0, atol=1e-6)



def _adapted_shapes(model, rank):
    blocks = [(n, m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return blocks


@pytest.mark.parametrize("cls, per_matrix", [(LoRAPreAdam, lambda r, p, q: 2 * r * (p + q)),
                                             (LoRAPreMuon, lambda r, p, q: r * (p + q))])
def test_state_size_per_adapted_matrix(cls, per_matrix):
    rank = 4
    model = tiny_llama(64, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48)
    opt = cls.for_model(model, rank=rank, lr=1e-3)
    x = torch.randint(0, 64, (2, 12))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    adapted = {id(p) for p in opt.param_groups[0]["params"]}
    shapes = _adapted_shapes(model, rank)
    assert len(adapted) == len(shapes) == 14  # q, k, v, o, gate, up, down in each of 2 blocks
    dense = 0
    for p, state in opt.state.items():
        floats = sum(t.numel() for t in state.values() if torch.is_tensor(t))
        if id(p) in adapted:
            assert floats == per_matrix(rank, *p.shape)
            assert all(t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t))
        else:  # embeddings and norms keep AdamW's two full-size moments
            assert floats == 2 * p.numel()
            dense += floats
    expected = sum(per_matrix(rank, *s) for _, s in shapes) + dense
    assert optimizer_state_bytes(opt) == 4 * expected


def _train(model, opt, batches):
    for x in batches:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cls, kw", [(LoRAPreAdam, {"weight_decay": 0.1, "scale": 0.5}), (LoRAPreMuon, {})])
def test_state_dict_round_trip_continues_identically(cls, kw):
    torch.manual_seed(1)
    batches = [torch.randint(0, 64, (2, 12)) for _ in range(6)]
    model = tiny_llama(64, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=48)
    opt = cls.for_model(model, rank=3, lr=3e-3, **kw)
    _train(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    _train(model, opt, batches[3:])  # the uninterrupted run

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = tiny_llama(64, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=48, seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = cls.for_model(resumed, rank=3, lr=3e-3, **kw)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, batches[3:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_factors_stay_fp32_when_loaded_into_bf16_weights():
    weight = torch.nn.Parameter(torch.randn(16, 12, dtype=torch.bfloat16))
    opt = LoRAPreAdam([{"params": [weight], "rank": 2}], lr=1e-3)
    weight.grad = torch.randn(16, 12, dtype=torch.bfloat16)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt2 = LoRAPreAdam([{"params": [weight], "rank": 2}], lr=1e-3)
    opt2.load_state_dict(saved)
    for key in ("m_B", "m_A", "v_B", "v_A"):
        assert opt2.state[weight][key].dtype == torch.float32
        assert torch.equal(opt2.state[weight][key], opt.state[weight][key])


def test_newton_schulz_roughly_orthogonalises():
    G = torch.randn(40, 24) @ torch.diag(torch.logspace(-1, 0, 24))
    s = torch.linalg.svdvals(newton_schulz(G))
    assert 0.5 < s.min() and s.max() < 1.3  # Muon's iteration lands singular values in about [0.7, 1.2]


def test_plain_adamw_group_matches_torch_adamw():
    torch.manual_seed(2)
    w1 = torch.nn.Parameter(torch.randn(5, 3))
    w2 = torch.nn.Parameter(w1.detach().clone())
    ours = LoRAPreAdam([{"params": [w1], "rank": 0}], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([w2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(5, 3)
        w1.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(w1, w2)


@pytest.mark.parametrize("name", ["lorapre", "lorapre-muon", "galore"])
def test_recipe_refuses_adapter_methods(tiny_cfg, name):
    with pytest.raises(ConfigError, match="method=full"):
        get_optimizer(name).check(tiny_cfg(method="lora", optimizer=name))
    with pytest.raises(ConfigError, match="does not take"):
        get_optimizer(name).check(tiny_cfg(method="full", optimizer=name, **{"optimizer_args.rnak": 2}))


def test_tiny_recipe_run_with_lorapre_decreases_loss(tiny_cfg):
    from rankwise.recipes.train import train

    summary = train(tiny_cfg(method="full", optimizer="lorapre", lr=3e-3, steps=8, betas="[0.9,0.95]",
                             **{"optimizer_args.rank": 2}), say=lambda *_: None)
    assert math.isfinite(summary["eval_loss"])
    assert summary["eval_loss"] < summary["eval_loss_start"]


def test_rest_frozen_leaves_only_low_rank_state():
    model = tiny_llama(64, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=48)
    opt = LoRAPreAdam.for_model(model, rank=2, rest="frozen", lr=1e-3)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "model.embed_tokens.weight" in frozen and any("norm" in n for n in frozen)
    assert all(p.requires_grad for p in opt.param_groups[0]["params"]) and not opt.param_groups[1]["params"]
    x = torch.randint(0, 64, (2, 12))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert optimizer_state_bytes(opt) == 4 * sum(2 * 2 * sum(p.shape) for p in opt.param_groups[0]["params"])


# ---- batched steps ---------------------------------------------------------------------------------
WEIGHT_SHAPES = [(9, 7), (6, 10), (9, 7), (9, 7), (6, 10), (8, 8)]  # repeated shapes share a batch


@pytest.mark.parametrize("cls, kw", [(LoRAPreAdam, {"weight_decay": 0.1, "scale": 0.5}),
                                     (LoRAPreMuon, {"weight_decay": 0.1}), (LoRAPreMuon, {"nesterov": False})])
@pytest.mark.parametrize("limit", [None, 130])  # 130 elements: batches of one or two weights
def test_batched_step_equals_one_optimizer_per_matrix(cls, kw, limit, monkeypatch):
    import rankwise.optim.batched as batched_module

    if limit is not None:
        monkeypatch.setattr(batched_module, "MAX_BATCH_ELEMENTS", limit)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in WEIGHT_SHAPES]
    bias = torch.nn.Parameter(torch.randn(5, generator=gen))
    twins, twin_bias = copy.deepcopy((weights, bias))
    start = [w.detach().clone() for w in weights]
    together = cls([{"params": weights, "rank": 2}, {"params": [bias], "rank": 0}], lr=1e-2, **kw)
    alone = [cls([{"params": [w], "rank": 2}], lr=1e-2, **kw) for w in twins]
    alone_bias = cls([{"params": [twin_bias], "rank": 0}], lr=1e-2, **kw)
    for step in range(1, 8):
        for w, twin in zip([*weights, bias], [*twins, twin_bias]):
            w.grad = torch.randn(w.shape, generator=gen)
            twin.grad = w.grad.clone()
        if step == 3:  # weight 2 skips a step: its step count parts from its batch-mates'
            weights[2].grad = twins[2].grad = None
        torch.manual_seed(0)  # the first step draws the A factors, weight by weight in both
        together.step()
        torch.manual_seed(0)
        for opt in [*alone, alone_bias]:
            opt.step()
    for w, twin, w0 in zip(weights, twins, start):
        assert float((w.detach() - w0).norm()) > 1e-3  # it moved
        torch.testing.assert_close(w, twin, rtol=1e-6, atol=1e-6)
        for key, value in together.state[w].items():
            other = next(o.state[twin] for o in alone if twin in o.state)[key]
            if torch.is_tensor(value):
                torch.testing.assert_close(value, other, rtol=1e-6, atol=1e-6)
            else:
                assert value == other
    torch.testing.assert_close(bias, twin_bias, rtol=1e-6, atol=1e-6)
    assert together.state[weights[2]]["step"] == 6 and together.state[weights[0]]["step"] == 7
