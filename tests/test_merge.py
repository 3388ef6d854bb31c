"""Merge exactness against PEFT itself: our W0 + sum_i w_i (alpha/r) B_i A_i equals PEFT's "cat"
weighted adapter (and not its "linear" one), on a real small Llama with random non-zero LoRA weights;
the factored merge (B_cat diag(w) A_cat x in a forward hook, what the search uses) gives the same
model outputs as the dense one to 1e-5, ranks unequal included."""
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file

from opmix_ray.config import ModelSection
from opmix_ray.engine.merge import (AdapterError, LowRankStack, MergedModel, delta_norm, load_lora_delta,
                                   load_lora_factors, merged_delta, stack_deltas, stack_factors)
from opmix_ray.model import build_model

SMALL = ModelSection(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
W = [0.5, 0.3, 0.2]


def _base(cfg=SMALL):
    return build_model(cfg, vocab_size=128, seq_len=16, seed=0)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Three PEFT LoRA adapters with random non-zero A and B, saved with save_pretrained."""
    dirs = []
    for i in range(3):
        peft_model = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        lora_dropout=0.0, init_lora_weights=False))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        d = tmp_path_factory.mktemp(f"adapter{i}")
        peft_model.save_pretrained(d)
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def stacked(adapter_dirs):
    return stack_deltas([load_lora_delta(d) for d in adapter_dirs])


def _peft_merged(adapter_dirs, weights, combination_type) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(_base(), adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    model.add_weighted_adapter(names, list(weights), "merged", combination_type=combination_type)
    model.set_adapter("merged")
    return _weights(model.merge_and_unload(adapter_names=["merged"]))


def _ours(stacked, weights) -> dict[str, torch.Tensor]:
    model = _base()
    MergedModel(model, stacked).apply(weights)
    return _weights(model)


def test_deltas_cover_every_target_module(stacked):
    assert len(stacked) == SMALL.num_layers * len(TARGETS)
    for m, D in stacked.items():
        assert m.startswith("model.layers.") and m.rsplit(".", 1)[1] in TARGETS
        assert D.shape[0] == 3 and D.dtype == np.float32
        assert float(np.abs(D).max()) > 1e-3  # really random and non-zero


def test_merge_equals_peft_cat(adapter_dirs, stacked):
    ours, peft_cat = _ours(stacked, W), _peft_merged(adapter_dirs, W, "cat")
    assert _max_diff(ours, peft_cat) <= 1e-5
    assert _max_diff(ours, _weights(_base())) > 1e-3  # the merge really changed the weights


def test_merge_differs_from_peft_linear(adapter_dirs, stacked):
    # PEFT "linear" mixes A and B separately (equal ranks required, as here): cross terms appear.
    ours, peft_linear = _ours(stacked, W), _peft_merged(adapter_dirs, W, "linear")
    assert _max_diff(ours, peft_linear) > 1e-3


def test_one_hot_gives_single_delta_and_reset_restores_w0(adapter_dirs, stacked):
    model = _base()
    w0 = _weights(model)
    merged = MergedModel(model, stacked)
    for i in range(3):
        e = np.eye(3)[i]
        merged.apply(e)
        for m, D in stacked.items():
            got = model.get_submodule(m).weight.detach()
            assert torch.allclose(got, w0[m + ".weight"] + torch.from_numpy(D[i]), atol=1e-6)
        # the one-hot merge equals that adapter alone in PEFT
        alone = _weights(PeftModel.from_pretrained(_base(), adapter_dirs[i]).merge_and_unload())
        assert _max_diff(_weights(model), alone) <= 1e-5
    merged.apply([0.1, 0.7, 0.2])
    merged.reset()
    after = _weights(model)
    assert all(torch.equal(after[k], w0[k]) for k in w0)  # bit-exact
    merged.apply(np.zeros(3))
    assert all(torch.equal(_weights(model)[k], w0[k]) for k in w0)


def test_apply_is_not_cumulative(stacked):
    model = _base()
    merged = MergedModel(model, stacked)
    merged.apply([1.0, 0.0, 0.0])
    merged.apply(W)
    assert _max_diff(_weights(model), _ours(stacked, W)) == 0.0


def test_delta_is_scaled_b_at_a(adapter_dirs):
    raw = load_file(str(adapter_dirs[0] / "adapter_model.safetensors"))
    conf = json.loads((adapter_dirs[0] / "adapter_config.json").read_text())
    delta = load_lora_delta(adapter_dirs[0])
    m = "model.layers.1.mlp.down_proj"
    A, B = raw[f"base_model.model.{m}.lora_A.weight"], raw[f"base_model.model.{m}.lora_B.weight"]
    np.testing.assert_allclose(delta[m], conf["lora_alpha"] / conf["r"] * (B @ A), rtol=1e-6)
    md = merged_delta(stack_deltas([delta, delta]), [0.25, 0.75])
    np.testing.assert_allclose(md[m], delta[m], rtol=1e-6)


def test_model_shape_mismatch_raises(stacked):
    other = _base(ModelSection(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=64))
    with pytest.raises(AdapterError, match="fix:"):
        MergedModel(other, stacked)
    fewer_layers = _base(ModelSection(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    with pytest.raises(AdapterError, match="fix:"):
        MergedModel(fewer_layers, stacked)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupted_safetensors_raises(adapter_dirs, tmp_path):
    bad = _copy(adapter_dirs[0], tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="fix:"):
        load_lora_delta(bad)
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="fix:"):
        load_lora_delta(bad)


def test_shape_mismatched_safetensors_raises(adapter_dirs, tmp_path):
    bad = _copy(adapter_dirs[0], tmp_path / "bad")
    t = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = np.ascontiguousarray(t[key][:3])  # rank 3 A against rank 4 B
    save_file(t, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="fix:"):
        load_lora_delta(bad)


def test_half_pair_raises(adapter_dirs, tmp_path):
    bad = _copy(adapter_dirs[0], tmp_path / "bad")
    t = load_file(str(bad / "adapter_model.safetensors"))
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(t, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="fix:"):
        load_lora_delta(bad)


def test_stack_rejects_mismatched_adapters(stacked):
    a = {m: D[0] for m, D in stacked.items()}
    b = dict(list(a.items())[:-1])
    with pytest.raises(AdapterError, match="fix:"):
        stack_deltas([a, b])
    c = {m: np.zeros((D.shape[0] + 1, D.shape[1]), np.float32) for m, D in a.items()}
    with pytest.raises(AdapterError, match="fix:"):
        stack_deltas([a, c])


def _logits(model, seed=0):
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def mixed_rank_dirs(adapter_dirs, tmp_path_factory):
    """The three adapters above plus one of rank 8 and alpha 4: the factors differ in size."""
    peft_model = get_peft_model(_base(), LoraConfig(r=8, lora_alpha=4, target_modules=TARGETS,
                                                    lora_dropout=0.0, init_lora_weights=False))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    d = tmp_path_factory.mktemp("adapter_r8")
    peft_model.save_pretrained(d)
    return [*adapter_dirs, d]


@pytest.mark.parametrize("norm", [None, "matched"])
def test_factored_merge_gives_the_dense_merge_outputs(mixed_rank_dirs, norm):
    dense = stack_deltas([load_lora_delta(d) for d in mixed_rank_dirs])
    factored = stack_factors([load_lora_factors(d) for d in mixed_rank_dirs])
    assert all(isinstance(D, LowRankStack) and D.shape == dense[m].shape for m, D in factored.items())
    assert delta_norm(factored, 3) == pytest.approx(delta_norm(dense, 3), rel=1e-6)
    norm_to = 0.5 * delta_norm(dense, 0) if norm else None
    a, b = _base(), _base()
    md, mf = MergedModel(a, dense, norm_to), MergedModel(b, factored, norm_to)
    w0 = _weights(b)
    for w in ([0.4, 0.3, 0.2, 0.1], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]):
        md.apply(w)
        mf.apply(w)
        ref, got = _logits(a), _logits(b)
        assert float((ref - got).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
        assert float((got - _logits(_base())).abs().max()) > 1e-3  # the merge really changes the outputs
    assert all(torch.equal(v, w0[k]) for k, v in _weights(b).items())  # the weights are never touched
    mf.close()
    assert torch.equal(_logits(b), _logits(_base()))  # hooks gone: the plain base model again


def test_factored_merge_equals_peft_cat_and_stores_only_the_factors(adapter_dirs):
    factored = stack_factors([load_lora_factors(d) for d in adapter_dirs])
    model = _base()
    MergedModel(model, factored).apply(W)
    peft = _base()
    peft.load_state_dict(_peft_merged(adapter_dirs, W, "cat"))
    assert float((_logits(model) - _logits(peft)).abs().max()) <= 1e-5
    dense_bytes = sum(D.shape[0] * D.shape[1] * D.shape[2] * 4 for D in factored.values())
    assert sum(D.nbytes for D in factored.values()) < 0.6 * dense_bytes  # r = 4 at in = out = 32 already
    m = "model.layers.0.mlp.down_proj"
    np.testing.assert_allclose(factored[m][1], load_lora_delta(adapter_dirs[1])[m], rtol=1e-5, atol=1e-7)


def test_factored_stack_refuses_other_modules_or_shapes(adapter_dirs):
    a = load_lora_factors(adapter_dirs[0])
    with pytest.raises(AdapterError, match="fix:"):
        stack_factors([a, dict(list(a.items())[:-1])])
    m = next(iter(a))
    with pytest.raises(AdapterError, match="fix:"):
        stack_factors([a, {**a, m: (a[m][0][:, :-1], a[m][1])}])
    other = _base(ModelSection(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=64))
    with pytest.raises(AdapterError, match="fix:"):
        MergedModel(other, stack_factors([a]))


@pytest.fixture(scope="module", params=["full", "lora"])
def embedding_dirs(request, tmp_path_factory):
    """Three adapters as adapters.embedding trains them: LoRA plus the tied embedding in full, or LoRA
    on the embedding too (its tied head's LoRA tied with it)."""
    from opmix_ray.config import load_config
    from opmix_ray.engine.adapters import lora_config
    cfg = load_config({"adapters": {"r": 4, "alpha": 8, "embedding": request.param}})
    dirs = []
    for i in range(3):
        peft_model = get_peft_model(_base(), lora_config(cfg, _base()))
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        d = tmp_path_factory.mktemp(f"emb_adapter{i}")
        peft_model.save_pretrained(d, save_embedding_layers=False)
        dirs.append((d, peft_model))
    return dirs


def test_embedding_adapter_keeps_the_head_tied_and_merges_exactly(embedding_dirs):
    from opmix_ray.engine.merge import load_dense_deltas, moved_by
    base = _base()
    (d0, trained0) = embedding_dirs[0]
    with torch.no_grad():  # ensure_weight_tying: the head's logits are still the embedding's, LoRA included
        x0 = torch.randint(0, 128, (1, 8))
        h = trained0.get_base_model().model(x0).last_hidden_state
        inner = trained0.get_base_model()
        emb_rows = inner.model.embed_tokens(torch.arange(128)[None])[0]
        assert torch.allclose(inner.lm_head(h), h @ emb_rows.T, atol=1e-5)
    dense = [load_dense_deltas(d, base) for d, _ in embedding_dirs]
    assert all(list(x) == ["model.embed_tokens.weight"] for x in dense)  # the tied pair once
    stacked = stack_factors([load_lora_factors(d) for d, _ in embedding_dirs])
    stacked = {m: D for m, D in stacked.items() if not moved_by(base, m, dense[0])}
    assert not any(m.endswith("lm_head") for m in stacked)  # the tied head moves with the embedding's delta
    stacked.update(stack_deltas(dense))
    x = torch.randint(0, 128, (2, 12))
    mm = MergedModel(_base().eval(), stacked)
    # one adapter at weight 1 is that adapter as PEFT loads it, embedding included
    for i, (d, _) in enumerate(embedding_dirs):
        mm.apply(np.eye(3)[i])
        peft_loaded = PeftModel.from_pretrained(_base(), d).eval()
        with torch.no_grad():
            assert torch.allclose(mm.model(x).logits, peft_loaded(x).logits, atol=2e-5)
    # a blend: the exact weighted sum of every delta, the embedding's too (dense reference)
    mm.apply(W)
    ref = _base().eval()
    lora = stack_deltas([{m: x for m, x in load_lora_delta(d).items() if not m.endswith("lm_head")}
                         for d, _ in embedding_dirs])
    with torch.no_grad():
        for m, delta in merged_delta({**lora, **stack_deltas(dense)}, W).items():
            p = dict(ref.named_parameters()).get(m)
            p = p if p is not None else ref.get_submodule(m).weight
            p.add_(torch.from_numpy(delta))
        assert torch.allclose(mm.model(x).logits, ref(x).logits, atol=2e-5)
    mm.close()
    with torch.no_grad():  # close() leaves the plain base, its tied embedding restored
        assert torch.allclose(mm.model(x).logits, _base().eval()(x).logits, atol=1e-6)


def test_frozen_embedding_adapters_have_no_dense_delta(adapter_dirs):
    from opmix_ray.engine.merge import load_dense_deltas
    assert load_dense_deltas(adapter_dirs[0], _base()) == {}
