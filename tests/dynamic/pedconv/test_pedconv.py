"""PEDConv (Hou & Kung 2021, Eq. 1-7, Appendix D/E): every path == per-sample reference, gradients,
sampling, info-max, sharing, the authors' checkpoint layout, spec parsing and errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import build_conv, conv_from_static, infomax_loss, parse_spec
from image_classification.dynamic.pedconv import (
    PATHS,
    PEDConv2d,
    convert_authors_state_dict,
    share_generator,
)
from image_classification.dynamic.pedconv.paths import heuristic_path

# triton: CUDA (or the Triton interpreter) only, rank 1 groups 1; tested in tests/dynamic/pedconv/test_triton_path.py
FAST_PATHS = [p for p in PATHS if p not in ("auto", "reference", "triton")]

GEOMETRIES = [
    # in, out, kernel, stride, padding, dilation, groups
    (8, 12, 3, 1, 1, 1, 1),
    (8, 12, 3, 2, 1, 2, 2),
    (8, 8, 3, 1, 1, 1, 8),  # depthwise
    (4, 8, 3, 2, 0, 1, 4),  # depthwise with channel multiplier
    (6, 12, 1, 2, 0, 1, 2),  # grouped strided 1x1 (C_in/g = 3: CP rank up to 3)
    (4, 6, (3, 1), (1, 2), (1, 0), 1, 1),
]


def plain_reference(module: PEDConv2d, x: torch.Tensor) -> torch.Tensor:
    """Per-sample F.conv2d with dynamic_weight (the formula of Eq. 2 / Appendix E)."""
    weights = module.dynamic_weight(x)
    outs = [
        F.conv2d(x[i : i + 1], weights[i], module.bias, module.stride, module.padding, module.dilation, module.groups)
        for i in range(x.shape[0])
    ]
    return torch.cat(outs)


def randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Move the generator away from its near-constant init so the factors really vary per sample."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "generator" in name or "bias" in name:
                param.normal_(0.0, std)
    return module


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("rank,reparam,components", [
    (1, "multiplicative", ("gamma", "phi", "psi")),
    (3, "multiplicative", ("gamma", "phi", "psi")),
    (2, "multiplicative", ("psi",)),
    (1, "multiplicative", ("gamma", "phi")),
    (1, "additive", ("gamma", "phi", "psi")),
    (2, "additive", ("phi", "psi")),
])
def test_paths_match_reference_forward_backward(geometry, rank, reparam, components):
    cin, cout, k, s, p, d, g = geometry
    torch.manual_seed(0)
    module = randomize(PEDConv2d(cin, cout, k, s, p, d, g, bias=True, rank=rank, reparam=reparam,
                                 components=components, sampling="none")).train()
    x = torch.randn(3, cin, 9, 8, requires_grad=True)
    expected = plain_reference(module, x)
    grads_ref = torch.autograd.grad(expected.square().sum(), [x, *module.parameters()], allow_unused=True)
    static = nn.Conv2d(cin, cout, k, s, p, d, g)
    assert expected.shape == static(x).shape
    for path in ["reference", *FAST_PATHS, "auto"]:
        module.path = path
        for batch in (1, 3):
            out = module(x[:batch])
            torch.testing.assert_close(out, expected[:batch], rtol=1e-5, atol=1e-5, msg=f"path {path} batch {batch}")
        grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()], allow_unused=True)
        for (name, _), g_path, g_ref in zip([("x", x), *module.named_parameters()], grads, grads_ref):
            if g_ref is None:
                assert g_path is None or not g_path.abs().any(), (path, name)
                continue
            scale = max(1.0, g_ref.abs().max().item())
            torch.testing.assert_close(g_path / scale, g_ref / scale, rtol=1e-5, atol=1e-5,
                                       msg=f"grad {name} path {path}")


def test_reference_is_eq3_written_out():
    """dynamic_weight == W_base * gamma (x) phi (x) psi summed over the rank (Eq. 1-2, rank R)."""
    torch.manual_seed(1)
    module = randomize(PEDConv2d(4, 6, 3, padding=1, rank=2, sampling="none")).eval()
    x = torch.randn(2, 4, 5, 5)
    gamma, phi, psi = module.factors(x)
    assert gamma.shape == (2, 2, 6) and phi.shape == (2, 2, 4) and psi.shape == (2, 2, 9)
    assert (gamma > 0).all() and (gamma < 1).all()
    weight = torch.zeros(2, 6, 4, 3, 3)
    for b, r, t, s, j in itertools.product(range(2), range(2), range(6), range(4), range(9)):
        weight[b, t, s, j // 3, j % 3] += (module.weight[t, s, j // 3, j % 3]
                                           * gamma[b, r, t] * phi[b, r, s] * psi[b, r, j])
    torch.testing.assert_close(module.dynamic_weight(x), weight)


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("reparam,rank", [("multiplicative", 1), ("multiplicative", 2), ("additive", 2)])
def test_gradcheck_float64(path, reparam, rank):
    torch.manual_seed(2)
    module = randomize(PEDConv2d(4, 4, 3, stride=2, padding=1, groups=2, rank=rank, reparam=reparam,
                                 sampling="none", path=path)).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    heads = module.generator.heads[0]
    params = [module.weight, module.generator.fc_share.weight, heads.fc_psi.weight, heads.fc_phi.weight,
              heads.fc_gamma.bias]
    assert torch.autograd.gradcheck(lambda inp, *_: module(inp), (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_bilinear_context_and_gradcheck():
    torch.manual_seed(3)
    module = randomize(PEDConv2d(9, 4, 3, padding=1, context="bilinear", sampling="none")).double()
    assert module.generator.context_dim == 9  # d = round(sqrt(9)) = 3, 3x3 second moment
    x = torch.randn(2, 9, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    module.train()
    module(x)
    assert module.infomax_term().item() > 0


def test_eval_deterministic_and_per_sample_independent():
    torch.manual_seed(4)
    module = randomize(PEDConv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(4, 8, 6, 6)
    out = module(x)
    torch.testing.assert_close(module(x), out, rtol=0, atol=0)
    for i in range(4):
        torch.testing.assert_close(module(x[i : i + 1]), out[i : i + 1], rtol=1e-5, atol=1e-5)
    assert module.infomax_term() is None


@pytest.mark.parametrize("sampling", ["fixed", "learned"])
def test_training_sampling_differs_between_calls(sampling):
    torch.manual_seed(5)
    module = PEDConv2d(8, 8, 3, padding=1, sampling=sampling).train()
    x = torch.randn(2, 8, 6, 6)
    assert not torch.allclose(module(x), module(x))
    g1, _, _ = module.factors(x)
    g2, _, _ = module.factors(x)
    assert not torch.allclose(g1, g2)
    module.eval()
    torch.testing.assert_close(module(x), module(x), rtol=0, atol=0)


def test_sampling_none_is_deterministic_in_training():
    torch.manual_seed(6)
    module = PEDConv2d(8, 8, 3, padding=1, sampling="none").train()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(module(x), module(x), rtol=0, atol=0)
    out_train = module(x)
    torch.testing.assert_close(module.eval()(x), out_train, rtol=1e-6, atol=1e-6)


def test_learned_sampling_has_logvar_heads_starting_at_noise_std():
    module = PEDConv2d(32, 16, 3, sampling="learned", noise_std=0.1)
    head = module.generator.heads[0]
    assert head.fc_gamma_logvar.out_features == 16
    torch.testing.assert_close(head.fc_psi_logvar.bias, torch.full((9,), 2 * torch.log(torch.tensor(0.1)).item()))


def test_init_factors_start_near_half():
    module = PEDConv2d(64, 64, 3, padding=1).eval()
    gamma, phi, psi = module.factors(torch.randn(2, 64, 8, 8))
    for factor in (gamma, phi, psi):
        assert (factor - 0.5).abs().max() < 0.01
    assert module.hidden == 4 and module.generator.fc_share.out_features == 4


def test_infomax_positive_in_training_absent_in_eval_and_target_detached():
    torch.manual_seed(7)
    module = PEDConv2d(8, 8, 3, padding=1).train()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    module(x)
    term = module.infomax_term()
    assert term is not None and term.item() > 0
    assert infomax_loss(nn.Sequential(module)) is term
    grads = torch.autograd.grad(term, [x, *module.parameters()], allow_unused=True)
    named = dict(zip(["x", *(n for n, _ in module.named_parameters())], grads))
    for name in ("infomax_decoder.0.weight", "infomax_decoder.2.weight", "generator.fc_share.weight",
                 "generator.heads.0.fc_phi.weight", "generator.heads.0.fc_gamma.weight"):
        assert named[name] is not None and named[name].abs().sum() > 0, name
    assert named["weight"] is None  # W_base is not involved

    # the target is detached: the gradient wrt x equals the one through the generator only
    with torch.no_grad():
        context_const = x.mean(dim=(2, 3))
    torch.manual_seed(8)
    module(x)
    torch.manual_seed(8)
    hidden = F.relu(module.generator.fc_share(x.mean(dim=(2, 3))))
    heads = module.generator.heads[0]
    mean = torch.cat([heads.fc_phi(hidden), heads.fc_gamma(hidden), heads.fc_psi(hidden)], 1)
    code = mean + 0.1 * torch.randn_like(mean)  # one draw for the fused [phi; gamma; psi] vector
    via_generator = F.mse_loss(module.infomax_decoder(code), context_const)
    torch.testing.assert_close(module.infomax_term(), via_generator)
    gx_layer = torch.autograd.grad(module.infomax_term(), x)[0]
    gx_generator = torch.autograd.grad(via_generator, x)[0]
    torch.testing.assert_close(gx_layer, gx_generator)

    module.eval()
    module(x)
    assert module.infomax_term() is None
    module.train()
    module.remove_infomax_decoder()
    module(x)
    assert module.infomax_term() is None and not any("infomax_decoder" in n for n, _ in module.named_parameters())


def test_deploy_parameter_count_matches_paper_formula():
    """W_base + (C_in + 1) h + (h + 1)(C_out + C_in/g + k^2); decoder named infomax_decoder."""
    module = PEDConv2d(64, 128, 3, bias=False)
    h = 64 // 16
    deploy = sum(p.numel() for n, p in module.named_parameters() if "infomax_decoder" not in n)
    assert deploy == 128 * 64 * 9 + (64 + 1) * h + (h + 1) * (128 + 64 + 9)
    decoder = sum(p.numel() for n, p in module.named_parameters() if "infomax_decoder" in n)
    assert decoder == (64 + 128 + 9 + 1) * h + (h + 1) * 64
    assert sum(p.numel() for p in PEDConv2d(64, 128, 3, bias=False, infomax=False).parameters()) == deploy


def test_state_dict_round_trip_and_static_weight():
    torch.manual_seed(9)
    a = randomize(PEDConv2d(8, 6, 3, padding=1, rank=2)).eval()
    b = PEDConv2d(8, 6, 3, padding=1, rank=2).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    static = nn.Conv2d(8, 6, 3, padding=1)
    converted = conv_from_static("pedconv", static)
    assert isinstance(converted, PEDConv2d)
    torch.testing.assert_close(converted.weight, static.weight)
    torch.testing.assert_close(converted.bias, static.bias)


def test_deepcopy_after_training_forward():
    module = PEDConv2d(8, 8, 3, padding=1).train()
    module(torch.randn(2, 8, 5, 5))
    assert module.infomax_term() is not None
    clone = copy.deepcopy(module)
    assert clone.infomax_term() is None
    torch.testing.assert_close(clone.eval()(torch.ones(1, 8, 5, 5)), module.eval()(torch.ones(1, 8, 5, 5)))


def test_jit_trace_eval():
    torch.manual_seed(10)
    module = randomize(PEDConv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 8, 6, 6)
    traced = torch.jit.trace(module, x)
    torch.testing.assert_close(traced(x), module(x))


def authors_forward(state: dict, prefix: str, x: torch.Tensor, padding: int) -> torch.Tensor:
    """The authors' layer (eval): GAP -> fc_share -> ReLU -> fc_inp/fc_oup/fc_k -> sigmoid, W = W_base * outer."""
    get = lambda n: state[f"{prefix}.{n}"]  # noqa: E731
    hidden = F.relu(F.linear(x.mean(dim=(2, 3)), get("attn.fc_share.weight"), get("attn.fc_share.bias")))
    phi = torch.sigmoid(F.linear(hidden, get("attn.fc_inp.weight"), get("attn.fc_inp.bias")))
    gamma = torch.sigmoid(F.linear(hidden, get("attn.fc_oup.weight"), get("attn.fc_oup.bias")))
    psi = torch.sigmoid(F.linear(hidden, get("attn.fc_k.weight"), get("attn.fc_k.bias")))
    base = get("weight")
    outs = []
    for b in range(x.shape[0]):
        weight = base * gamma[b].view(-1, 1, 1, 1) * phi[b].view(1, -1, 1, 1) * psi[b].view(1, 1, *base.shape[2:])
        outs.append(F.conv2d(x[b : b + 1], weight, padding=padding))
    return torch.cat(outs)


def test_convert_authors_state_dict():
    torch.manual_seed(11)
    cin, cout, h = 64, 16, 4
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    authors = {
        "module.layer1.0.conv1.weight": r(cout, cin, 3, 3),
        "module.layer1.0.conv1.attn.fc_share.weight": r(h, cin), "module.layer1.0.conv1.attn.fc_share.bias": r(h),
        "module.layer1.0.conv1.attn.fc_inp.weight": r(cin, h), "module.layer1.0.conv1.attn.fc_inp.bias": r(cin),
        "module.layer1.0.conv1.attn.fc_oup.weight": r(cout, h), "module.layer1.0.conv1.attn.fc_oup.bias": r(cout),
        "module.layer1.0.conv1.attn.fc_k.weight": r(9, h), "module.layer1.0.conv1.attn.fc_k.bias": r(9),
        "module.layer1.0.conv1.attn.decoder.0.weight": r(h, cin + cout + 9),
        "module.layer1.0.conv1.attn.decoder.0.bias": r(h),
        "module.layer1.0.conv1.attn.decoder.2.weight": r(cin, h), "module.layer1.0.conv1.attn.decoder.2.bias": r(cin),
        "module.layer1.0.bn1.weight": r(cout),
    }
    converted = convert_authors_state_dict({"state_dict": authors, "epoch": 3})
    assert "layer1.0.bn1.weight" in converted and "layer1.0.conv1.generator.heads.0.fc_phi.bias" in converted
    model = nn.Module()
    model.conv = PEDConv2d(cin, cout, 3, padding=1, bias=False, reduction=16)
    own = {k.replace("layer1.0.conv1.", "conv."): v for k, v in converted.items() if k.startswith("layer1.0.conv1.")}
    model.load_state_dict(own)
    model.eval()
    x = torch.randn(3, cin, 6, 6)
    plain = {k[len("module."):]: v for k, v in authors.items()}
    torch.testing.assert_close(model.conv(x), authors_forward(plain, "layer1.0.conv1", x, 1), rtol=1e-5, atol=1e-5)
    # the decoder input order is the authors' [phi; gamma; psi] (noise-free pre-sigmoid in this check)
    model.train()
    model.conv.sampling = "none"
    model.conv(x)
    hidden = F.relu(F.linear(x.mean(dim=(2, 3)), plain["layer1.0.conv1.attn.fc_share.weight"],
                             plain["layer1.0.conv1.attn.fc_share.bias"]))
    code = torch.cat([F.linear(hidden, plain[f"layer1.0.conv1.attn.{n}.weight"], plain[f"layer1.0.conv1.attn.{n}.bias"])
                      for n in ("fc_inp", "fc_oup", "fc_k")], 1)
    recon = F.linear(F.relu(F.linear(code, plain["layer1.0.conv1.attn.decoder.0.weight"],
                                     plain["layer1.0.conv1.attn.decoder.0.bias"])),
                     plain["layer1.0.conv1.attn.decoder.2.weight"], plain["layer1.0.conv1.attn.decoder.2.bias"])
    torch.testing.assert_close(model.conv.infomax_term(), F.mse_loss(recon, x.mean(dim=(2, 3))))


def test_share_generator_block():
    torch.manual_seed(12)
    conv1 = PEDConv2d(8, 16, 3, stride=2, padding=1, bias=False, sampling="none")
    conv2 = PEDConv2d(16, 16, 3, padding=1, bias=False, sampling="none")
    before = sum(p.numel() for m in (conv1, conv2) for n, p in m.named_parameters() if "infomax_decoder" not in n)
    share_generator([conv1, conv2])
    after = sum(p.numel() for m in (conv1, conv2) for n, p in m.named_parameters() if "infomax_decoder" not in n)
    assert after < before
    assert conv2.generator is None and conv2.infomax_decoder is None
    randomize(conv1)
    block = nn.Sequential(conv1, nn.ReLU(), conv2).train()
    x = torch.randn(3, 8, 8, 8, requires_grad=True)
    out = block(x)
    # own reference: the block input's GAP drives both convs' components
    hidden = F.relu(conv1.generator.fc_share(x.mean(dim=(2, 3))))
    refs = []
    for conv, heads in zip((conv1, conv2), conv1.generator.heads):
        gamma, phi, psi = (torch.sigmoid(getattr(heads, f"fc_{n}")(hidden)) for n in ("gamma", "phi", "psi"))
        refs.append(conv.weight[None] * gamma[:, :, None, None, None] * phi[:, None, :, None, None]
                    * psi.view(-1, 1, 1, 3, 3))
    mid = torch.relu(torch.cat([F.conv2d(x[b : b + 1], refs[0][b], stride=2, padding=1) for b in range(3)]))
    expected = torch.cat([F.conv2d(mid[b : b + 1], refs[1][b], padding=1) for b in range(3)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    term = conv1.infomax_term()
    assert term is not None and term.item() > 0 and conv2.infomax_term() is None
    assert conv1.infomax_decoder[0].in_features == (8 + 16 + 9) + (16 + 16 + 9)
    (out.sum() + term).backward()
    assert conv1.generator.heads[1].fc_gamma.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="run that conv first"):
        conv2(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="already"):
        share_generator([conv1, conv2])


@pytest.mark.parametrize("attr,value", [("context", "bilinear"), ("sampling", "learned"), ("noise_std", 0.5)])
def test_share_generator_refuses_layers_that_differ_in_the_generator(attr, value):
    """A follower runs on the leader's generator: a different context (or noise) would be silently replaced."""
    leader = PEDConv2d(8, 16, 3, padding=1, bias=False)
    follower = PEDConv2d(16, 16, 3, padding=1, bias=False, **{attr: value})
    with pytest.raises(ValueError, match=f"same {attr}"):
        share_generator([leader, follower])
    assert not leader._followers and not follower._is_follower and follower.generator is not None


def test_a_path_registered_after_import_is_a_valid_spec():
    """register_path's promise: ``pedconv:path=NAME`` is accepted from then on, and the layer runs that path."""
    from image_classification.dynamic.pedconv.paths import PATH_REGISTRY, PathSpec, register_path

    calls = []

    def run(layer, x, weight, factors):
        calls.append(tuple(x.shape))
        return PATH_REGISTRY["fold"].run(layer, x, weight, factors)

    with pytest.raises(ValueError, match="valid: auto, reference"):
        parse_spec("pedconv:path=my_path")
    register_path(PathSpec("my_path", run, "fold, counted"))
    try:
        assert "my_path" in PATHS
        torch.manual_seed(3)
        module = build_conv(parse_spec("pedconv:path=my_path,sampling=none"), 8, 8, 3, padding=1).eval()
        reference = copy.deepcopy(module)
        reference.path = "reference"
        x = torch.randn(2, 8, 6, 6)
        torch.testing.assert_close(module(x), reference(x))
        assert calls == [(2, 8, 6, 6)]
    finally:
        PATH_REGISTRY.pop("my_path")


def test_spec_parsing_and_build():
    spec = parse_spec("pedconv:rank=4,components=phi+psi,sampling=learned,reparam=additive,path=factored")
    assert spec.options["rank"] == 4 and spec.options["components"] == ("phi", "psi")
    assert str(parse_spec("pedconv")) == "pedconv"
    assert "rank=4" in str(spec)
    module = build_conv(spec, 8, 8, 3, padding=1)
    assert isinstance(module, PEDConv2d) and module.rank == 4 and module.components == ("phi", "psi")
    assert module.generator.heads[0].fc_phi.out_features == 4 * 8
    assert not hasattr(module.generator.heads[0], "fc_gamma")
    module = build_conv("pedconv:context=bilinear,infomax=false,reduction=4", 64, 64, 3)
    assert module.infomax_decoder is None and module.hidden == 16


@pytest.mark.parametrize("call,match", [
    (lambda: PEDConv2d(6, 8, 3, groups=4), "divisible by groups"),
    (lambda: PEDConv2d(8, 8, 3, rank=0), "rank"),
    (lambda: PEDConv2d(8, 8, 3, components=("gamma", "delta")), "components"),
    (lambda: PEDConv2d(8, 8, 3, path="fastest"), "path"),
    (lambda: parse_spec("pedconv:colour=red"), "unknown option 'colour'"),
    (lambda: parse_spec("pedconv:rank=0"), "rank"),
    (lambda: parse_spec("pedconv:components=gamma+delta"), "components"),
    (lambda: PEDConv2d(8, 8, 3)(torch.randn(1, 7, 5, 5)), "expects input"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_heuristic_path_choice():
    """With tuning off (the test suite's setting) auto is the deterministic shape heuristic."""
    def choose(module: PEDConv2d, batch: int, size: int, grad: bool = True) -> str:
        return heuristic_path(module, (batch, module.in_channels, size, size), grad)

    dense = PEDConv2d(16, 16, 3, padding=1)
    assert choose(dense, 1, 8) == "fold" and choose(dense, 1, 2) == "patch_gemm"  # C_out > 2 H_out W_out
    assert choose(PEDConv2d(16, 16, 1), 1, 2) == "materialize"
    assert choose(dense, 4, 32) == "fold" and choose(dense, 4, 5) == "patch_gemm"  # narrow: by grouped size
    wide = PEDConv2d(128, 128, 3, padding=1)  # 116M multiply-adds per sample at 28x28
    assert choose(wide, 4, 28) == "sample_loop" and choose(wide, 4, 7) == "patch_gemm"
    assert choose(PEDConv2d(16, 16, 3, groups=16), 4, 8) == "materialize"
    assert choose(PEDConv2d(16, 16, 1), 4, 8) == "materialize"
    assert choose(PEDConv2d(256, 256, 1), 32, 2) == "fold"  # per-sample weights larger than the activations
    assert choose(PEDConv2d(16, 16, 3, reparam="additive"), 4, 32) == "fold"
    assert choose(PEDConv2d(16, 16, 3, reparam="additive"), 1, 32) == "materialize"
    assert choose(PEDConv2d(16, 16, 3, rank=2), 1, 8) == "materialize"
    assert choose(PEDConv2d(16, 16, 3, rank=2, components=("psi",)), 1, 8) == "fold"
    module = PEDConv2d(16, 16, 3, padding=1)
    module(torch.randn(2, 16, 8, 8))
    assert module.logged_paths()[((2, 16, 8, 8), True)]["path"] == choose(module, 2, 8)
    assert module.logged_paths()[((2, 16, 8, 8), True)]["source"] == "heuristic"
    explicit = PEDConv2d(16, 16, 3, padding=1, path="reference")
    explicit(torch.randn(2, 16, 8, 8))
    assert explicit.logged_paths()[((2, 16, 8, 8), True)] == {"path": "reference", "source": "explicit", "times_ms": {}}


def test_fused_generator_keeps_state_dict_names():
    module = PEDConv2d(16, 8, 3, bias=False, sampling="learned")
    assert sorted(module.state_dict()) == sorted(
        ["weight", "generator.fc_share.weight", "generator.fc_share.bias"]
        + [f"generator.heads.0.fc_{n}{s}.{p}" for n in ("phi", "gamma", "psi") for s in ("", "_logvar")
           for p in ("weight", "bias")]
        + [f"infomax_decoder.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")])


@pytest.mark.parametrize("sampling", ["fixed", "learned"])
def test_fused_generator_equals_per_head_formula(sampling):
    """One fused Linear + one noise draw == the per-head Linears of Eq. 7 with Eq. 5 noise (same stream)."""
    torch.manual_seed(13)
    module = randomize(PEDConv2d(16, 8, 3, padding=1, sampling=sampling, noise_std=0.2, rank=2)).train()
    x = torch.randn(3, 16, 5, 5)
    torch.manual_seed(14)
    gamma, phi, psi = module.factors(x)
    heads = module.generator.heads[0]
    hidden = F.relu(module.generator.fc_share(x.mean(dim=(2, 3))))
    mean = torch.cat([heads.fc_phi(hidden), heads.fc_gamma(hidden), heads.fc_psi(hidden)], 1)
    torch.manual_seed(14)
    if sampling == "learned":
        logvar = torch.cat([heads.fc_phi_logvar(hidden), heads.fc_gamma_logvar(hidden), heads.fc_psi_logvar(hidden)], 1)
        pre = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    else:
        pre = mean + 0.2 * torch.randn_like(mean)
    post = torch.sigmoid(pre)
    torch.testing.assert_close(phi, post[:, :32].view(3, 2, 16))
    torch.testing.assert_close(gamma, post[:, 32:48].view(3, 2, 8))
    torch.testing.assert_close(psi, post[:, 48:].view(3, 2, 9))


def test_a_rank_beyond_the_weights_cp_rank_is_refused_before_allocating() -> None:
    """``rank=1000000`` sat silent for a minute building generator heads; a 3-way tensor never needs more CP terms
    than the smallest product of two of its dimensions."""
    from image_classification.dynamic.pedconv.layer import max_cp_rank

    assert max_cp_rank(64, 64, 9) == 576 and max_cp_rank(32, 1, 9) == 9 and max_cp_rank(256, 64, 1) == 64
    PEDConv2d(8, 8, 3, groups=8, rank=8)  # depthwise: up to min(8, 9, 72) = 8
    with pytest.raises(ValueError, match=r"rank 9 is more than any 8 x 1 x 9 weight .* at most 8; choose rank <= 8"):
        PEDConv2d(8, 8, 3, groups=8, rank=9)
    with pytest.raises(ValueError, match=r"rank 1000000 .* 16 x 16 x 9 .* at most 144"):
        PEDConv2d(16, 16, 3, rank=1000000)
