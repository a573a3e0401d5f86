"""The PEDConv authors' layout at rank R (their ``Attn4d_CP`` with r > 1): the converter reorders the
heads' (dim, R) rows into PEDConv2d's (R, dim) order, or refuses with one line - never a silent
wrong load. The authors' layer is written here from their layout formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic.pedconv import PEDConv2d, convert_authors_state_dict


def authors_rank_r(state: dict, prefix: str, rank: int, x: torch.Tensor, padding: int) -> torch.Tensor:
    """Attn4d_CP (eval): heads read as view(B, dim, R); W_b = W_base * sum_r gamma_r o phi_r o psi_r."""
    get = lambda n: state[f"{prefix}.{n}"]  # noqa: E731
    base = get("weight")
    cout, cin, kh, kw = base.shape
    b = x.shape[0]
    hidden = F.relu(F.linear(x.mean((2, 3)), get("attn.fc_share.weight"), get("attn.fc_share.bias")))

    def head(n: str, dim: int) -> torch.Tensor:
        return torch.sigmoid(F.linear(hidden, get(f"attn.{n}.weight"), get(f"attn.{n}.bias"))).view(b, dim, rank)

    phi, gamma, psi = head("fc_inp", cin), head("fc_oup", cout), head("fc_k", kh * kw)
    outs = []
    for i in range(b):
        cp = sum(gamma[i, :, r].view(-1, 1, 1, 1) * phi[i, :, r].view(1, -1, 1, 1) * psi[i, :, r].view(1, 1, kh, kw)
                 for r in range(rank))
        outs.append(F.conv2d(x[i:i + 1], base * cp, padding=padding))
    return torch.cat(outs)


def authors_state(cin: int, cout: int, k: int, rank: int, hidden: int, decoder: bool = True) -> dict:
    g = torch.Generator().manual_seed(rank)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    p = "module.layer2.1.conv2"
    state = {
        f"{p}.weight": r(cout, cin, k, k),
        f"{p}.attn.fc_share.weight": r(hidden, cin), f"{p}.attn.fc_share.bias": r(hidden),
        f"{p}.attn.fc_inp.weight": r(cin * rank, hidden), f"{p}.attn.fc_inp.bias": r(cin * rank),
        f"{p}.attn.fc_oup.weight": r(cout * rank, hidden), f"{p}.attn.fc_oup.bias": r(cout * rank),
        f"{p}.attn.fc_k.weight": r(k * k * rank, hidden), f"{p}.attn.fc_k.bias": r(k * k * rank),
    }
    if decoder:
        state.update({f"{p}.attn.decoder.0.weight": r(hidden, rank * (cin + cout + k * k)),
                      f"{p}.attn.decoder.0.bias": r(hidden),
                      f"{p}.attn.decoder.2.weight": r(cin, hidden), f"{p}.attn.decoder.2.bias": r(cin)})
    return state


def _load(converted: dict, conv: nn.Module) -> None:
    prefix = "layer2.1.conv2."
    conv.load_state_dict({k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}, strict=True)


@pytest.mark.parametrize("rank", [4, 1])
def test_rank_r_authors_layout_converts_exactly(rank):
    cin, cout, k, hidden = 64, 32, 3, 4
    state = authors_state(cin, cout, k, rank, hidden)
    plain = {key[len("module."):]: v for key, v in state.items()}
    conv = PEDConv2d(cin, cout, k, padding=1, bias=False, rank=rank)
    _load(convert_authors_state_dict({"state_dict": state}), conv)
    conv.eval()
    x = torch.randn(3, cin, 5, 5)
    with torch.no_grad():
        want = authors_rank_r(plain, "layer2.1.conv2", rank, x, 1)
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
    # the decoder's input columns follow the heads: its reconstruction of the noise-free pre-sigmoid
    # code [inp; oup; k] equals the authors' decoder on their own code
    conv.train()
    conv.sampling = "none"
    conv(x)
    get = lambda n: plain[f"layer2.1.conv2.attn.{n}"]  # noqa: E731
    h = F.relu(F.linear(x.mean((2, 3)), get("fc_share.weight"), get("fc_share.bias")))
    code = torch.cat([F.linear(h, get(f"{n}.weight"), get(f"{n}.bias")) for n in ("fc_inp", "fc_oup", "fc_k")], 1)
    rec = F.linear(F.relu(F.linear(code, get("decoder.0.weight"), get("decoder.0.bias"))),
                   get("decoder.2.weight"), get("decoder.2.bias"))
    torch.testing.assert_close(conv.infomax_term(), F.mse_loss(rec, x.mean((2, 3))), rtol=1e-5, atol=1e-6)


def test_a_bare_rank_r_layer_converts_exactly():
    """A layer's own state dict (keys weight, attn.fc_inp.weight, ... with no module path) is found and
    reordered too, and recognised as the authors' layout."""
    from image_classification.dynamic.pedconv import AUTHORS_LAYOUT

    cin, cout, k, hidden, rank = 64, 32, 3, 4, 4
    prefix = "module.layer2.1.conv2."
    bare = {key[len(prefix):]: v for key, v in authors_state(cin, cout, k, rank, hidden).items()}
    assert AUTHORS_LAYOUT.detect(bare)
    conv = PEDConv2d(cin, cout, k, padding=1, bias=False, rank=rank)
    conv.load_state_dict(convert_authors_state_dict(bare), strict=True)
    conv.eval()
    x = torch.randn(3, cin, 5, 5)
    plain = {f"layer2.1.conv2.{key}": v for key, v in bare.items()}
    with torch.no_grad():
        torch.testing.assert_close(conv(x), authors_rank_r(plain, "layer2.1.conv2", rank, x, 1), rtol=1e-5,
                                   atol=1e-5)


def test_rank_r_without_conversion_of_the_rows_would_be_wrong():
    """What the issue reported: names mapped, rows not reordered -> a strict load, a wrong layer."""
    cin, cout, rank = 64, 32, 4
    state = authors_state(cin, cout, 3, rank, 4, decoder=False)
    plain = {key[len("module."):]: v for key, v in state.items()}
    renamed = {k.replace("attn.fc_share", "generator.fc_share").replace("attn.fc_inp", "generator.heads.0.fc_phi")
               .replace("attn.fc_oup", "generator.heads.0.fc_gamma").replace("attn.fc_k", "generator.heads.0.fc_psi"): v
               for k, v in plain.items()}
    naive = PEDConv2d(cin, cout, 3, padding=1, bias=False, rank=rank, infomax=False)
    _load(renamed, naive)
    converted = PEDConv2d(cin, cout, 3, padding=1, bias=False, rank=rank, infomax=False)
    _load(convert_authors_state_dict(state), converted)
    x = torch.randn(2, cin, 5, 5)
    with torch.no_grad():
        want = authors_rank_r(plain, "layer2.1.conv2", rank, x, 1)
        assert (naive.eval()(x) - want).norm() / want.norm() > 0.05
        torch.testing.assert_close(converted.eval()(x), want, rtol=1e-5, atol=1e-5)


def test_unmappable_authors_layouts_are_refused():
    state = authors_state(64, 32, 3, 4, 4)
    p = "module.layer2.1.conv2"
    bad_rows = {**state, f"{p}.attn.fc_k.weight": torch.zeros(9 * 3, 4), f"{p}.attn.fc_k.bias": torch.zeros(27)}
    with pytest.raises(ValueError, match="no common rank R"):
        convert_authors_state_dict(bad_rows)
    with pytest.raises(ValueError, match="base weight layer2.1.conv2.weight is missing"):
        convert_authors_state_dict({k: v for k, v in state.items() if not k.endswith("conv2.weight")})
    with pytest.raises(ValueError, match="decoder.0.weight reads 100 inputs, rank 4 heads give 420"):
        convert_authors_state_dict({**state, f"{p}.attn.decoder.0.weight": torch.zeros(4, 100)})
