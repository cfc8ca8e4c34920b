import json

import pytest
import torch

from torchmics.models import GPT, PRESETS, GPTConfig, build_model, causal_lm_loss, get_preset, logits_of

TINY = PRESETS["tiny"]


def test_forward_shape():
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 17))
    assert model(idx).shape == (3, 17, TINY.vocab_size)


def test_tied_weights_are_one_tensor():
    model = GPT(TINY)
    assert model.lm_head.weight is model.wte.weight
    untied = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, bias=True),
        GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=100, tie_embeddings=False),
    ],
)
def test_num_params_matches_module(cfg):
    model = GPT(cfg)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert cfg.num_params() == sum(unique.values())


def test_benchmark_preset_size():
    cfg = get_preset("1.4b")
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.seq_len, cfg.vocab_size) == (2048, 24, 16, 2048, 50304)
    assert cfg.num_params() == pytest.approx(1.41e9, rel=0.01)
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_flops_per_token_formula():
    cfg = get_preset("1.4b")
    matmul_params = cfg.num_params() - cfg.seq_len * cfg.d_model - cfg.vocab_size * cfg.d_model
    assert cfg.flops_per_token() == 6 * matmul_params + 12 * 24 * 2048 * 2048
    assert cfg.flops_per_token(1024) == cfg.flops_per_token() - 12 * 24 * 2048 * 1024


def test_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % TINY.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model = GPT(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, TINY.vocab_size, (4, 33))
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(30):
        loss = causal_lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)  # init is near-uniform
    assert losses[-1] < 0.5 * losses[0]


def test_build_preset():
    model, info = build_model("tiny", seq_len=64)
    assert isinstance(model, GPT)
    assert (info.name, info.num_params, info.seq_len, info.vocab_size) == ("tiny", TINY.num_params(), 64, 256)
    assert info.flops_per_token == TINY.flops_per_token(64)


def test_build_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tiny, small"):
        build_model("nope")
    with pytest.raises(ValueError, match="must be in \\[1, 128\\]"):
        build_model("tiny", seq_len=129)
    with pytest.raises(ValueError, match="does not exist"):
        build_model(f"hf:{tmp_path}/missing.json")
    with pytest.raises(ValueError, match="maximum context 128"):
        GPT(TINY)(torch.zeros(1, 129, dtype=torch.long))


def test_build_hf_and_logits_of(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=128)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    model, info = build_model(f"hf:{config_path}")
    params = sum(p.numel() for p in model.parameters())
    assert (info.n_layer, info.d_model, info.vocab_size, info.seq_len) == (2, 32, 128, 64)
    assert info.num_params == params
    assert info.flops_per_token == 6 * params + 12 * 2 * 32 * 64
    idx = torch.randint(0, 128, (2, 10))
    assert logits_of(model, idx).shape == (2, 10, 128)
    assert logits_of(GPT(TINY), idx).shape == (2, 10, 256)
    with pytest.raises(ValueError, match="must be in \\[1, 64\\]"):
        build_model(f"hf:{config_path}", seq_len=65)
