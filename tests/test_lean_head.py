"""model.lean_head: int8 embedding and lm_head with APOLLO-Mini, lm_head updated slice by slice in the loss
backward, the embedding on its batch rows: it trains, every tensor changes in step 1, the slice-wise update
matches the whole-gradient one, the sparse row update equals the dense one, the planner fits the meter."""
import pytest
import torch

from qapollo.config import ConfigError, load_config, validate
from qapollo.layerwise import LayerwiseOptimizer
from qapollo.optim.updaters import ApolloUpdater
from qapollo.loss import causal_lm_loss
from qapollo.planner import predict_peak
from qapollo.model import Int8Embedding, Int8Linear, RowGrad, TiedGrad, build_model
from tests.helpers import measured_peak, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def lean(**over):
    return tiny_config(**{"model__lean_head": True, **over})


def run_steps(cfg, two_phase: bool, steps: int = 3, loss_fn=causal_lm_loss, fixed: bool = False):
    model = build_model(cfg.model, "cpu", seed=0)
    model.train()
    opt = LayerwiseOptimizer(model, cfg.optim, max_steps=10, seed=0, stochastic_round=cfg.model.stochastic_round)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        if i == 0 or not fixed:
            x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
        opt.begin_step(last_micro=not two_phase, check=i == 0)
        loss = loss_fn(model, x)
        loss.backward()
        if two_phase:  # every gradient whole (lm_head's too), then the updates
            opt.step_pending(check=i == 0)
        opt.after_backward()
        opt.end_step(check=i == 0)  # the startup guard: raises unless every tensor changed
        losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, opt


def test_lean_head_builds_int8_and_trains():
    cfg = lean()
    losses, state, opt = run_steps(cfg, two_phase=False, steps=8, fixed=True)  # learns one batch by heart
    assert isinstance(opt.model.model.embed_tokens, Int8Embedding) and isinstance(opt.model.lm_head, Int8Linear)
    assert not any(n.startswith(("lm_head", "model.embed_tokens")) for n, _ in opt.model.named_parameters())
    assert "lm_head.weight_codes" in state and "model.embed_tokens.weight_codes" in state
    assert min(losses[-3:]) < losses[0] - 0.5, losses


def test_every_tensor_changes_in_first_step():
    cfg = lean()
    model = build_model(cfg.model, "cpu", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = LayerwiseOptimizer(model, cfg.optim, max_steps=10, seed=0)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    opt.begin_step(check=True)
    causal_lm_loss(model, x).backward()
    opt.after_backward()
    opt.end_step(check=True)
    assert opt._changed["lm_head"] > 0 and opt._changed["model.embed_tokens"] > 0
    for k, v in model.state_dict().items():
        if not k.endswith("inv_freq"):
            assert not torch.equal(before[k], v), k
    # the embedding moved only on the rows of the batch
    rows = torch.unique(x)
    other = torch.ones(cfg.model.vocab_size, dtype=torch.bool)
    other[rows] = False
    codes0, codes1 = before["model.embed_tokens.weight_codes"], model.model.embed_tokens.weight_codes
    assert torch.equal(codes0[other], codes1[other])
    assert not torch.equal(codes0[rows], codes1[rows])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slice_wise_lm_head_update_matches_whole_gradient(dtype):
    """In backward (lm_head's gradient only as slices, read twice) vs two-phase (its gradient made whole,
    then the ordinary APOLLO-Mini step on it): same rounding noise per element, so the int8 codes agree
    except where ‖G‖ and R, summed in another order, move a value across a rounding boundary."""
    cfg = lean(model__dtype=dtype)
    l1, s1, _ = run_steps(cfg, two_phase=False)
    l2, s2, _ = run_steps(cfg, two_phase=True)
    assert l1[0] == l2[0]
    for k in s1:
        a, b = s1[k], s2[k]
        if k.endswith("weight_codes"):
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (k, diff.max(), (diff > 0).float().mean())
        elif a.is_floating_point():
            assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5), k
    assert abs(l1[-1] - l2[-1]) < 1e-2 * abs(l2[-1])


def test_sparse_row_update_equals_dense():
    """The embedding's RowGrad step == the same APOLLO-Mini step on the dense gradient (zeros elsewhere) on
    the rows of the batch; the other rows stay bit for bit (the dense step would requantize them, which
    is not exactly idempotent: its scales move by fp32 noise). Each step starts both from the same weights."""
    cfg = lean()
    embs, upds = [], []
    for _ in range(2):
        e = Int8Embedding(cfg.model.vocab_size, cfg.model.hidden_size, cfg.model.group_size, "cpu", torch.float32)
        e.init_normal_(0.02, seed=3)
        e.param_name = "model.embed_tokens"
        embs.append(e)
        upds.append(ApolloUpdater("model.embed_tokens", e, cfg.optim, proj_seed=5, sr_seed=6, stochastic=True))
    sparse, dense = embs
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        for k in ("weight_codes", "weight_scale", "weight_zero"):
            getattr(dense, k).copy_(getattr(sparse, k))
        before = sparse.weight_codes.clone()
        rows = torch.unique(torch.randint(0, cfg.model.vocab_size, (40,), generator=gen))
        vals = torch.randn(rows.shape[0], cfg.model.hidden_size, generator=gen)
        rg = RowGrad(rows, vals, sparse.shape)
        assert upds[0].step_rows(rg.rows, rg.values, 0.01, True) > 0
        upds[1].step(rg.dense(), 0.01, False)
        other = torch.ones(cfg.model.vocab_size, dtype=torch.bool)
        other[rows] = False
        assert torch.equal(sparse.weight_codes[rows], dense.weight_codes[rows]), step
        assert torch.equal(sparse.weight_codes[other], before[other]), step
        gi = (rows[:, None] + torch.zeros(1, dtype=torch.long)).reshape(-1)  # one group per row (hidden = g)
        assert torch.equal(sparse.weight_zero[gi], dense.weight_zero[gi])
        assert torch.allclose(sparse.weight_scale[gi], dense.weight_scale[gi], rtol=1e-6, atol=0)
        for k in ("exp_avg", "exp_avg_sq", "prev_norm"):
            assert torch.allclose(upds[0].state[k], upds[1].state[k], rtol=1e-5, atol=1e-12), k


def test_lean_planner_within_10_percent_of_live_meter():
    cfg = lean(train__batch_size=4, train__seq_len=64, model__max_position_embeddings=64, train__check_updates=False)
    validate(cfg)
    plan = predict_peak(cfg, "cpu", chunked_loss=True)
    meas = measured_peak(cfg, True)
    assert abs(plan["peak_bytes"] - meas) <= 0.10 * meas, (plan["phase"], plan["peak_bytes"], meas)
    # and it is below the plan of the same model with the float head
    assert plan["peak_bytes"] < predict_peak(lean(model__lean_head=False, train__batch_size=4, train__seq_len=64,
                                                  train__check_updates=False), "cpu")["peak_bytes"]


@pytest.mark.parametrize("over,msg", [
    (["model.weight_quant=false", "optim.name=adamw"], "weight_quant"),
    (["optim.name=apollo", "optim.scale_type=channel", "optim.rank=2", "optim.lean_optim=apollo_mini"],
     "lean_optim=apollo_mini needs optim.name=apollo_mini"),
    (["optim.lean_optim=adam"], "lean_optim must be factored or apollo_mini"),
    (["train.grad_accum_steps=2"], "accum_mode=lagged"),
    # a width that is not a multiple of the group (SmolLM2-135M: 576): the message names a group size that works
    (["model.hidden_size=576", "model.num_attention_heads=9"], r"divisible by model.group_size \(128\).*set model.group_size=64"),
])
def test_lean_head_refuses_what_it_does_not_support(over, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config("configs/llama_20m.yaml", ["model.lean_head=true"] + over)


def test_lean_head_refuses_data_parallel_with_one_line():
    cfg = lean()
    model = build_model(cfg.model, "cpu", seed=0)
    with pytest.raises(ConfigError, match="data-parallel"):
        LayerwiseOptimizer(model, cfg.optim, max_steps=10, reducer=object())
    from qapollo.plan import plan_main
    with pytest.raises(ConfigError, match="data-parallel"):
        plan_main(["--config", "configs/llama_7b_8gb.yaml", "--nproc", "2"])


@pytest.mark.parametrize("lean_optim", ["factored", "apollo_mini"])
def test_lagged_accumulation_steps_every_micro_batch_and_passes_the_guard(lean_optim):
    """accum_mode=lagged, 2 micro-batches: embedding and lm_head step on each (the previous step's size), their
    projected gradients commit once per step, and no full gradient of theirs is ever kept."""
    cfg = lean(train__grad_accum_steps=2, train__accum_mode="lagged", optim__lean_optim=lean_optim)
    validate(cfg)
    model = build_model(cfg.model, "cpu", seed=0)
    opt = LayerwiseOptimizer(model, cfg.optim, max_steps=10, seed=0, accum_mode="lagged", grad_accum_steps=2)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(6):
        for micro in range(2):
            opt.begin_step(last_micro=micro == 1, check=step == 0)
            loss = causal_lm_loss(model, x)
            (loss / 2).backward()
            opt.after_backward()
            assert model.lm_head.weight_grad is None and model.model.embed_tokens.weight_grad is None
        opt.end_step(check=step == 0)
        losses.append(loss.item())
        for name in ("lm_head", "model.embed_tokens"):
            upd = opt.updaters[name]
            assert upd.kind == ("factored" if lean_optim == "factored" else "apollo") and upd.lagged
            st = upd.state
            assert st["step"] == step + 1
            assert (st["count"] == 0) if lean_optim == "factored" else (st["r_count"] == 0 and st["lag_step"] is not None)
    assert losses[-1] < losses[0] - 0.5, losses


def test_lean_run_evaluates_from_its_checkpoint(corpus, tmp_path, capsys):
    """`qapollo eval` of a lean_head run: the checkpoint's int8 embedding/lm_head load and give the
    trainer's own eval loss."""
    import json
    import os
    from qapollo.cli import main
    from tests.helpers import make_cfg, run
    tr = run(make_cfg(corpus, tmp_path, "lean", model__lean_head=True, train__max_steps=2))
    ours = tr.evaluate()["eval_loss"]
    capsys.readouterr()
    assert main(["eval", os.path.join(tmp_path, "lean"), "--data", corpus["data.path"], "--max-tokens", "512",
                 "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(res["loss"] - ours) < 1.0 and res["loss"] == res["loss"]


def test_lean_lr_steps_the_int8_embedding_and_lm_head_and_nothing_else():
    """optim.lean_lr: the lr of the lean int8 embedding / lm_head only (norms keep float_lr, matrices lr)."""
    base = lean(optim__lr=1e-3, optim__float_lr=1e-3)
    _, s1, o1 = run_steps(base, two_phase=False, steps=1)
    _, s4, o4 = run_steps(lean(optim__lr=1e-3, optim__float_lr=1e-3, optim__lean_lr=4e-3), two_phase=False, steps=1)
    for k in s1:
        if not k.startswith(("lm_head", "model.embed_tokens")):
            assert torch.equal(s1[k], s4[k]), k  # the same step for every other tensor
    w0 = o1.model.lm_head.dequantized(torch.float32)  # after the step at float_lr ...
    w4 = o4.model.lm_head.dequantized(torch.float32)  # ... and at 4x that
    lm0 = build_model(base.model, "cpu", seed=0).lm_head.dequantized(torch.float32)
    # stochastic rounding moves a weight by one step with probability |update| / step: E|change| ∝ lr
    ratio = ((w4 - lm0).abs().mean() / (w0 - lm0).abs().mean()).item()
    assert 3.0 < ratio < 5.0, ratio  # ≈ 1 if lean_lr were ignored


def test_lean_lr_needs_lean_head():
    with pytest.raises(ConfigError, match="optim.lean_lr must be > 0, and needs model.lean_head=true"):
        validate(tiny_config(optim__lean_lr=1e-3))


@pytest.mark.parametrize("lean_optim", ["factored", "apollo_mini"])
def test_tied_lean_head_steps_once_on_the_sum_of_both_gradients(lean_optim):
    """Tied embeddings: one int8 tensor is embedding and lm_head, with one updater. In backward, lm_head's
    slices wait for the embedding's rows and the sum goes in as one step (model.TiedGrad): the same codes
    as the two-phase step on the whole summed gradient; the rows outside the batch move (lm_head's part)
    and the gradient stepped on carries the embedding's rows on top of lm_head's."""
    cfg = lean(model__tie_word_embeddings=True, optim__lean_optim=lean_optim)
    l1, s1, opt = run_steps(cfg, two_phase=False)
    l2, s2, _ = run_steps(cfg, two_phase=True)
    assert opt.model.lm_head is opt.model.model.embed_tokens
    assert [n for n in opt.updaters if "embed" in n or "head" in n] == ["model.embed_tokens"]
    assert l1 == l2
    for k in s1:
        if k.endswith("weight_codes"):
            diff = (s1[k].int() - s2[k].int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, k
    # one more step, watched: what the updater steps on, and which rows move
    upd, seen = opt.updaters["model.embed_tokens"], []
    step_slices = upd.step_slices

    def spy(src, *a, **kw):
        assert isinstance(src, TiedGrad)
        seen.append((src.full() - src.head.full().float(), src.rows))
        return step_slices(src, *a, **kw)
    upd.step_slices = spy
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    before = opt.model.model.embed_tokens.weight_codes.clone()
    opt.begin_step()
    causal_lm_loss(opt.model, x).backward()
    opt.after_backward()
    opt.end_step()
    (added, rows), = seen
    assert torch.allclose(added, rows.dense(), atol=1e-6) and rows.values.abs().sum() > 0
    outside = torch.ones(cfg.model.vocab_size, dtype=torch.bool)
    outside[torch.unique(x)] = False
    moved = (opt.model.model.embed_tokens.weight_codes != before).any(dim=1)
    assert moved[outside].any() and moved[~outside].all()
