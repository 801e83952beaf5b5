"""In-backward updates equal the two-phase step; the lr schedule; the startup guard."""
import pytest
import torch

from qapollo.layerwise import LayerwiseOptimizer, UpdateCheckError
from qapollo.optim.schedule import lr_at
from qapollo.model import build_model, enable_activation_checkpointing, int8_modules
from tests.helpers import tiny_config


def snapshot(model):
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def run_steps(cfg, two_phase: bool, steps: int = 3, ckpt: bool = False):
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu", seed=0)
    if ckpt:
        enable_activation_checkpointing(model)
    model.train()
    opt = LayerwiseOptimizer(model, cfg.optim, max_steps=10, seed=0, stochastic_round=cfg.model.stochastic_round)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
        check = i == 0
        opt.begin_step(last_micro=not two_phase, check=check)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if two_phase:
            opt.count_changes = check
            opt.step_pending()
        opt.end_step(check=check)
        losses.append(loss.item())
    return losses, snapshot(model)


@pytest.mark.parametrize("quant", [True, False])
@pytest.mark.parametrize("ckpt", [False, True])
def test_in_backward_equals_two_phase(quant, ckpt):
    cfg = tiny_config(model__weight_quant=quant)
    l1, s1 = run_steps(cfg, two_phase=False, ckpt=ckpt)
    l2, s2 = run_steps(cfg, two_phase=True, ckpt=ckpt)
    assert l1 == l2
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert l1[-1] < l1[0] + 1.0  # sanity: it trained without blowing up


def test_checkpointing_does_not_change_the_result():
    cfg = tiny_config()
    l1, s1 = run_steps(cfg, two_phase=False, ckpt=False)
    l2, s2 = run_steps(cfg, two_phase=False, ckpt=True)
    assert l1 == l2
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_adamw_baseline_runs():
    cfg = tiny_config(model__weight_quant=False, optim__name="adamw")
    losses, _ = run_steps(cfg, two_phase=False, steps=4)  # step 0 runs the every-tensor-changed check
    assert all(l == l for l in losses)


def test_lr_schedule():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)  # first update is > 0 (the reference starts at 0)
    assert lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[-1] > 0.1 and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(500, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def make(cfg):
    model = build_model(cfg.model, "cpu", seed=0)
    opt = LayerwiseOptimizer(model, cfg.optim, max_steps=10, seed=0)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    return model, opt, x


def test_guard_fails_on_a_parameter_whose_update_is_lost():
    cfg = tiny_config()
    model, opt, x = make(cfg)
    frozen = "model.norm.weight"
    opt.updaters[frozen].step = lambda grad, lr, count, last=True: 0  # an updater that writes nothing
    opt.begin_step(check=True)
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(UpdateCheckError, match=frozen):
        opt.end_step(check=True)


def test_guard_fails_on_an_int8_layer_with_zero_lr():
    cfg = tiny_config()
    model, opt, x = make(cfg)
    name = int8_modules(model)[0][0]
    upd = opt.updaters[name]
    orig = upd.step
    upd.step = lambda grad, lr, count, last=True: orig(grad, 0.0, count)  # lr 0 → RTN requant leaves codes as they are
    upd.stochastic = False
    opt.begin_step(check=True)
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(UpdateCheckError, match=name):
        opt.end_step(check=True)


def test_guard_fails_when_a_tensor_gets_no_gradient():
    cfg = tiny_config()
    model, opt, x = make(cfg)
    model.lm_head.weight.requires_grad_(False)  # frozen after the optimizer was built: hook never fires
    opt.begin_step(check=True)
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(UpdateCheckError, match="lm_head.weight"):
        opt.end_step(check=True)


def test_every_tensor_changes_in_first_step():
    cfg = tiny_config()
    model, opt, x = make(cfg)
    before = snapshot(model)
    opt.begin_step(check=True)
    model(input_ids=x, labels=x).loss.backward()
    opt.end_step(check=True)
    after = snapshot(model)
    for k in before:
        if k.endswith("inv_freq"):
            continue
        assert not torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind


def test_gradient_accumulation_equals_big_batch_for_float_path():
    """GA=2 on two halves == one step on the whole batch (float weights, AdamW; exact up to fp32 sums)."""
    cfg = tiny_config(model__weight_quant=False)
    x = torch.randint(0, cfg.model.vocab_size, (4, 16), generator=torch.Generator().manual_seed(3))
    m1, o1, _ = make(cfg)
    o1.begin_step()
    m1(input_ids=x, labels=x).loss.backward()
    o1.end_step()
    m2, o2, _ = make(cfg)
    for i, half in enumerate((x[:2], x[2:])):
        o2.begin_step(last_micro=i == 1)
        (m2(input_ids=half, labels=half).loss / 2).backward()
    o2.end_step()
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k


def test_bf16_model_passes_the_startup_check():
    """bf16 compute: norms are kept fp32, so even a warmup-sized first update changes every tensor."""
    cfg = tiny_config(model__dtype="bfloat16")
    cfg.optim.warmup_steps = 1000  # first lr = 1e-5: far below a bf16 ulp of 1.0
    model, opt, x = make(cfg)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    opt.begin_step(check=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.end_step(check=True)


def test_paper_intermediate_sizes_build():
    cfg = tiny_config(model__intermediate_size=344)  # 128*344 = 344 groups of 128 spanning rows
    model, opt, x = make(cfg)
    opt.begin_step(check=True)
    model(input_ids=x, labels=x).loss.backward()
    opt.end_step(check=True)


@pytest.mark.parametrize("kind", ["adam8bit", "adamw"])
def test_chunked_float_update_equals_whole(kind, monkeypatch):
    """Row-chunked optimizers over views of one tensor give the same result as one optimizer."""
    from qapollo.optim import updaters
    from qapollo.optim.updaters import TorchAdamUpdater
    cfg = tiny_config()
    torch.manual_seed(0)
    w0 = torch.randn(96, 128) * 0.02
    grads = [torch.randn(96, 128) for _ in range(3)]
    out = []
    for chunk in (1 << 22, 4096 * 2):  # one chunk vs 64-row chunks (64 + 32 rows)
        monkeypatch.setattr(updaters, "FLOAT_CHUNK_ELEMS", chunk)
        p = torch.nn.Parameter(w0.clone())
        u = TorchAdamUpdater("w", p, kind, cfg.optim, 0.0)
        assert len(u.chunks) == (1 if chunk > 96 * 128 else 2)
        for g in grads:
            assert u.step(g.clone(), 1e-2, True) > 0
        out.append(p.detach().clone())
    assert torch.equal(out[0], out[1])


def _small_steps(p, store, kind, steps=20, chunk=1 << 22, monkeypatch=None):
    """A trained model's float tensor: values ~0.1, an lr whose steps are below half a bf16 ulp; gradients
    of a fixed direction (signal, the sign pattern of a seeded draw) under noise twice its size. kind:
    the float tensors' Adam (adam8bit, adamw) or APOLLO-Mini on a float matrix (model.weight_quant=false)."""
    from qapollo.optim import updaters
    from qapollo.optim.updaters import ApolloUpdater, TorchAdamUpdater
    if monkeypatch is not None:
        monkeypatch.setattr(updaters, "FLOAT_CHUNK_ELEMS", chunk)
    if kind == "apollo":  # its step at scale 128 is larger per unit of lr
        u, lr = ApolloUpdater("w", p, tiny_config().optim, 5, 6, False, store=store), 3e-5
    else:
        u, lr = TorchAdamUpdater("w", p, kind, tiny_config().optim, 0.0, store=store), 6e-5
    for g in _signal_grads(p.shape, steps):
        u.step(g.to(p.dtype), lr, False)
    return u


def _signal_grads(shape, steps):
    gen = torch.Generator().manual_seed(1)
    signal = torch.randn(shape, generator=torch.Generator().manual_seed(2)).sign()
    return [signal + 2 * torch.randn(shape, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("kind", ["adam8bit", "adamw", "apollo"])
def test_bf16_float_tensor_takes_small_updates(kind):
    """Rounded to nearest, a bf16 tensor keeps almost none of a trained model's small Adam steps (SmolLM2's
    embedding: 9.5 % of elements moved in 74 steps); stochastically rounded (model.float_store) it moves as
    the fp32 tensor does, on average over its elements."""
    from qapollo.model import float_store
    w0 = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.1
    down = -torch.randn(96, 128, generator=torch.Generator().manual_seed(2)).sign()  # against the gradient
    moved = {}
    for name, dtype, store in (("fp32", torch.float32, None), ("nearest", torch.bfloat16, None),
                               ("stochastic", torch.bfloat16, float_store(7))):
        p = torch.nn.Parameter(w0.clone().to(dtype))
        _small_steps(p, store, kind)
        moved[name] = ((p.detach().float() - w0.to(dtype).float()) * down).mean().item()  # descent per element
    assert moved["fp32"] > 0 and abs(moved["nearest"]) < 0.25 * moved["fp32"], moved  # measured: 0.13
    assert abs(moved["stochastic"] - moved["fp32"]) < 0.05 * moved["fp32"], moved


@pytest.mark.parametrize("kind", ["adam8bit", "adamw"])
def test_bf16_rounding_noise_is_the_same_chunked_and_resumed(kind, monkeypatch):
    """The noise is a function of (tensor, step, element): row chunks give the whole tensor's result, and a
    state saved and loaded into a fresh updater continues as the uninterrupted one."""
    from qapollo.model import float_store
    w0 = (torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.1).to(torch.bfloat16)
    out = []
    for chunk in (1 << 22, 4096 * 2):
        p = torch.nn.Parameter(w0.clone())
        u = _small_steps(p, float_store(7), kind, steps=3, chunk=chunk, monkeypatch=monkeypatch)
        assert len(u.chunks) == (1 if chunk > 96 * 128 else 2)
        out.append(p.detach().clone())
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], w0)
    p = torch.nn.Parameter(w0.clone())
    u = _small_steps(p, float_store(7), kind, steps=2, chunk=4096 * 2, monkeypatch=monkeypatch)
    tensors, scalars = u.state_dict()
    p2 = torch.nn.Parameter(p.detach().clone())
    from qapollo.optim.updaters import TorchAdamUpdater
    u2 = TorchAdamUpdater("w", p2, kind, tiny_config().optim, 0.0, store=float_store(7))
    u2.load_state_dict(tensors, scalars)
    u2.step(_signal_grads(p.shape, 3)[2].to(p.dtype), 6e-5, False)  # the third step, as the runs above took it
    assert torch.equal(p2.detach(), out[1])
