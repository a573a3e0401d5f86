"""The operator registry: spec parsing, building, conversion from static convs, error messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from image_classification.dynamic import (
    ConvSpec,
    conv_from_static,
    list_operators,
    parse_spec,
)

PEERS = ("dcd", "dyconv", "condconv", "involution", "static")


def test_peers_are_registered():
    names = list_operators()
    assert list(names) == sorted(names)
    for name in PEERS:
        assert name in names


def test_parse_spec_fills_defaults_and_round_trips():
    spec = parse_spec("dyconv")
    assert spec.name == "dyconv" and spec.options["k"] == 4 and spec.options["temperature"] == 30.0
    assert str(spec) == "dyconv"
    for text in ("dyconv:k=6", "dcd:blocks=2,components=phi,mode=joint", "condconv:k=4", "involution:group_channels=8",
                 "static", "dyconv:anneal_epochs=0,temperature=5.0"):
        parsed = parse_spec(text)
        again = parse_spec(str(parsed))
        assert again == parsed
    assert parse_spec(" DyConv : k = 2 ").options["k"] == 2
    assert parse_spec(parse_spec("condconv:k=3")) == parse_spec("condconv:k=3")
    assert parse_spec("dyconv", k=7).options["k"] == 7


def test_unknown_operator_and_option_list_valid_names():
    with pytest.raises(ValueError) as err:
        parse_spec("dynconv")
    for name in PEERS:
        assert name in str(err.value)
    with pytest.raises(ValueError,
                       match="valid options: blocks, components, latent, latent_kernel, mode, pool, reduction"):
        parse_spec("dcd:rank=1")
    with pytest.raises(ValueError, match="option 'rank' of operator 'pedconv' is given twice in 'pedconv:rank=2,"):
        parse_spec("pedconv:rank=2,rank=4")
    with pytest.raises(ValueError, match="valid options: anneal_epochs"):
        parse_spec("dyconv", experts=2)
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("dyconv:k")
    with pytest.raises(ValueError, match="valid: channel, joint"):
        parse_spec("dcd:mode=spatial")
    with pytest.raises(ValueError, match="empty operator spec"):
        parse_spec("")
    with pytest.raises(ValueError, match="boolean"):
        from image_classification.dynamic import Option

        Option(bool, True).parse("x", "flag", "maybe")


@pytest.mark.parametrize("name", ["static", "dcd", "dyconv", "condconv"])
def test_conv_from_static_keeps_geometry_and_seeds_weights(name):
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
    m = conv_from_static(name, conv)
    assert (m.stride, m.padding, m.dilation, m.groups) == ((2, 2), (2, 2), (2, 2), 2)
    weight = m.weight if m.weight.dim() == 4 else m.weight[0]
    torch.testing.assert_close(weight, conv.weight)


def test_conv_from_static_rejects_unsupported_padding():
    with pytest.raises(ValueError, match="padding_mode"):
        conv_from_static("dcd", nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="string padding"):
        conv_from_static("dcd", nn.Conv2d(4, 4, 3, padding="same"))


def test_convspec_static_flag():
    assert parse_spec("static").is_static and not parse_spec("dcd").is_static
    assert isinstance(parse_spec("dcd"), ConvSpec)
