"""ODConv (Li et al., ICLR 2022, Eq. 2): every path == the plain per-sample formula, gradcheck, heads,
temperature, registry options, counts and BatchNorm folding of one layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import build_conv, parse_spec, set_epoch
from image_classification.dynamic.peers.odconv import PATHS, ODConv2d
from image_classification.measurement.macs import conv_macs

GEOMETRIES = [
    # cin, cout, k, stride, padding, dilation, groups
    (8, 16, 3, 2, 1, 1, 1),
    (8, 8, 3, 1, 1, 1, 8),  # depthwise: no filter head
    (8, 16, 1, 1, 0, 1, 2),  # 1x1 grouped: no spatial head
    (8, 12, (1, 3), (1, 2), (0, 1), 1, 1),
    (8, 8, 3, 1, 2, 2, 2),
]


def plain_eq2(m: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    """ODConv Eq. 2 written out: attentions from GAP-FC-BN-ReLU-heads, then sum_i a_w a_f a_c a_s W_i per sample."""
    att = m.attention
    h = F.relu(att.bn(att.fc(x.mean((2, 3)))))
    t = m.temperature
    a_c = torch.sigmoid(att.channel_fc(h) / t)
    a_f = torch.sigmoid(att.filter_fc(h) / t) if att.filter_fc is not None else torch.ones(x.shape[0], m.out_channels)
    kh, kw = m.kernel_size
    a_s = torch.sigmoid(att.spatial_fc(h) / t) if att.spatial_fc is not None else torch.ones(x.shape[0], kh * kw)
    a_w = torch.softmax(att.kernel_fc(h) / t, 1) if att.kernel_fc is not None else torch.ones(x.shape[0], 1)
    cin_g, cout_g = m.in_channels // m.groups, m.out_channels // m.groups
    outs = []
    for b in range(x.shape[0]):
        w = torch.zeros_like(m.weight[0])
        for i in range(m.num_kernels):
            w = w + a_w[b, i] * m.weight[i] * a_s[b].view(1, 1, kh, kw)
        for o in range(m.out_channels):
            g = o // cout_g
            w[o] = w[o] * a_f[b, o] * a_c[b, g * cin_g : (g + 1) * cin_g].view(-1, 1, 1).to(w)
        y = F.conv2d(x[b : b + 1], w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        outs.append(y)
    return torch.cat(outs)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
@pytest.mark.parametrize("n", [1, 3])
def test_every_path_equals_the_plain_formula(geom, n):
    cin, cout, k, s, p, d, g = geom
    torch.manual_seed(0)
    m = ODConv2d(cin, cout, k, s, p, d, g, bias=True, k=n, temperature=2.0).double().eval()
    nn.init.normal_(m.bias)
    static = nn.Conv2d(cin, cout, k, s, p, d, g)
    for batch in (3, 1):
        x = torch.randn(batch, cin, 7, 6, dtype=torch.float64)
        expected = plain_eq2(m, x)
        assert expected.shape == static.double()(x).shape
        grads = None
        for path in PATHS:
            m.path = path
            xr = x.clone().requires_grad_(True)
            y = m(xr)
            torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10, msg=f"path {path}")
            gy = torch.autograd.grad(y, [xr, *m.parameters()], torch.ones_like(y))
            if grads is None:
                grads = gy
            for a, b in zip(gy, grads):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad, path {path}")


@pytest.mark.parametrize("path", ["materialize", "factored", "unfold", "reference"])
def test_gradcheck(path):
    torch.manual_seed(0)
    for n, k, g in ((1, 3, 1), (2, 3, 2), (2, 1, 1)):
        m = ODConv2d(4, 4, k, padding=k // 2, groups=g, k=n, temperature=1.5, path=path).double().eval()
        x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


def test_heads_follow_the_released_code():
    m = ODConv2d(64, 128, 3, padding=1, k=4)
    assert m.hidden == 16 and ODConv2d(512, 512, 3).hidden == 32  # max(int(C_in / 16), 16)
    assert m.attention.spatial_fc.out_features == 9 and m.attention.kernel_fc.out_features == 4
    assert m.attention.channel_fc.out_features == 64 and m.attention.filter_fc.out_features == 128
    assert m.attention.fc.bias is None and isinstance(m.attention.bn, nn.BatchNorm1d)
    pw = ODConv2d(64, 128, 1, k=1)
    assert pw.attention.spatial_fc is None and pw.attention.kernel_fc is None
    dw = ODConv2d(32, 32, 3, padding=1, groups=32)
    assert dw.attention.filter_fc is None and dw.depthwise
    x = torch.randn(3, 64, 5, 5)
    att = m.eval().attentions(x)
    torch.testing.assert_close(att.kernel.sum(1), torch.ones(3))
    assert att.channel.shape == (3, 64) and att.filter.shape == (3, 128) and att.spatial.shape == (3, 9)
    assert float(att.channel.detach().min()) > 0 and float(att.channel.detach().max()) < 1


def test_layer_parameters_match_the_formula():
    for cin, cout, k, g, n in ((64, 128, 3, 1, 1), (64, 128, 3, 1, 4), (96, 96, 3, 96, 4), (32, 64, 1, 1, 1)):
        m = ODConv2d(cin, cout, k, groups=g, bias=False, k=n)
        a = max(int(cin * 0.0625), 16)
        heads = cin + (0 if cin == cout == g else cout) + (k * k if k > 1 else 0) + (n if n > 1 else 0)
        expected = n * cout * cin // g * k * k + cin * a + 2 * a + a * heads + heads
        assert sum(p.numel() for p in m.parameters()) == expected


def test_macs_static_plus_attention_plus_synthesis():
    m = ODConv2d(64, 128, 3, padding=1, bias=False, k=4)
    weight = 128 * 64 * 9
    attention = 64 * 16 + 16 * (64 + 128 + 9 + 4)
    expected = conv_macs(64, 128, 3, 1, (14, 14)) + attention + 2 * weight + 4 * weight
    assert m.macs((1, 64, 14, 14)) == expected


def test_temperature_schedule_and_state():
    model = nn.Sequential(ODConv2d(8, 8, 3, padding=1), nn.ReLU(), ODConv2d(8, 8, 1, anneal_epochs=4))
    for epoch, (t0, t1) in {0: (30.0, 30.0), 1: (27.1, 22.75), 5: (15.5, 1.0), 12: (1.0, 1.0)}.items():
        set_epoch(model, epoch)
        assert float(model[0].temperature) == pytest.approx(t0)
        assert float(model[2].temperature) == pytest.approx(t1)
    fresh = ODConv2d(8, 8, 3, padding=1)
    fresh.load_state_dict(model[0].state_dict())
    assert float(fresh.temperature) == 1.0  # a trained model evaluates at its trained temperature


def test_registry_options_and_errors():
    spec = parse_spec("odconv")
    assert spec.options == {"k": 1, "reduction": 0.0625, "temperature": 30.0, "anneal_epochs": 10, "path": "auto"}
    assert str(parse_spec("odconv:k=4")) == "odconv:k=4"
    m = build_conv("odconv:k=4,reduction=0.25,temperature=1", 64, 64, 3, padding=1)
    assert isinstance(m, ODConv2d) and m.num_kernels == 4 and m.hidden == 16 and float(m.temperature) == 1.0
    for bad, match in (("odconv:k=0", "must be >= 1"), ("odconv:path=fast", "valid"),
                       ("odconv:heads=2", "unknown option")):
        with pytest.raises(ValueError, match=match):
            parse_spec(bad)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ODConv2d(8, 8, 3, padding=1).train()(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="expected input"):
        ODConv2d(8, 8, 3).eval()(torch.randn(2, 4, 5, 5))


def test_static_weight_seeds_every_kernel():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    m = ODConv2d(8, 16, 3, padding=1, bias=True, k=3)
    m.load_static_weight(conv.weight.detach(), conv.bias.detach())
    for i in range(3):
        torch.testing.assert_close(m.weight[i], conv.weight)
    torch.testing.assert_close(m.bias, conv.bias)


def _random_bn(channels: int, cls=nn.BatchNorm2d) -> nn.Module:
    bn = cls(channels).double()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return bn.eval()


@pytest.mark.parametrize("n, groups", [(1, 1), (3, 2), (1, 8)])
def test_fold_output_affine_and_inner_batchnorm_are_exact(n, groups):
    torch.manual_seed(0)
    m = ODConv2d(8, 8, 3, padding=1, groups=groups, bias=False, k=n, temperature=2.0).double().eval()
    m.attention.bn = _random_bn(m.hidden, nn.BatchNorm1d)
    bn = _random_bn(8)
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    expected = bn(m(x))
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        m.fold_output_affine(scale, bn.bias - bn.running_mean * scale)
    assert m.fold_inner_batchnorm() == 1 and isinstance(m.attention.bn, nn.Identity)
    assert m.fold_inner_batchnorm() == 0
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch, conv, params_m, macs_m", [
    ("resnet18", "odconv", 11.94, 1838), ("resnet18", "odconv:k=4", 44.90, None),
    ("mobilenet_v2_x1.0", "odconv", 4.94, None), ("mobilenet_v2_x1.0", "odconv:k=4", 11.51, None),
    ("mobilenet_v2_x0.5", "odconv", 2.43, None), ("resnet50", "odconv", 28.64, None),
])
def test_counts_match_odconv_tables(arch, conv, params_m, macs_m):
    """ODConv Tables 1-2 (the authors' released models): parameters to the printed 0.01M; ResNet-18 1x MAdds
    within 1 % (the other MAdds use a counter ODConv does not name, see docs/counts.md)."""
    from image_classification.measurement.macs import count_macs, count_params
    from image_classification.models import build_model

    model = build_model(arch, conv)
    assert abs(count_params(model).deploy / 1e6 - params_m) < 0.006
    if macs_m is not None:
        assert abs(count_macs(model, 224).total / 1e6 - macs_m) < 0.01 * macs_m


def test_profiler_table_and_placement() -> None:
    from image_classification.measurement import paper_tables
    from image_classification.models import build_model

    rows = [r for r in paper_tables.PAPER_ROWS if r.table == "odconv"]
    assert {(r.arch, r.conv) for r in rows} >= {("resnet18", "odconv:k=4"), ("mobilenet_v2_x1.0", "odconv")}
    [row] = paper_tables.table_rows("odconv", [r for r in rows if r.arch == "resnet18" and r.conv == "odconv"])
    assert row["ours_params_m"] == 11.944 and abs(row["diff_macs_pct"]) < 1
    # placement 'paper' on MobileNetV2: every block conv (depthwise included) and the last 1x1 conv
    model = build_model("mobilenet_v2_x0.35", "odconv", num_classes=10)
    assert len(model.dynamic_convs) == 2 + 16 * 3 + 1 and "features.18.0" in model.dynamic_convs
    assert isinstance(model.features[1].conv[0][0], ODConv2d) and model.features[1].conv[0][0].depthwise
