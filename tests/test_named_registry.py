"""The one registry idiom (image_classification/named_registry.py) and the four registries built on it."""

from __future__ import annotations

import pytest

from image_classification.named_registry import NamedRegistry


def test_register_lookup_names_and_refusals() -> None:
    shapes = NamedRegistry("shape")
    assert shapes.register("square", 4) == 4
    shapes.decorator("triangle")(3)
    assert shapes.lookup("square") == 4 and shapes.names() == ["square", "triangle"]
    with pytest.raises(ValueError, match="^shape 'square' is already registered$"):
        shapes.register("square", 5)
    shapes.register("square", 5, replace=True)
    assert shapes["square"] == 5
    with pytest.raises(ValueError, match=r"^unknown shape 'circle'; valid shapes: square, triangle$"):
        shapes.lookup("circle")
    shapes.unregister("triangle")
    with pytest.raises(ValueError, match="unknown shape 'triangle'"):
        shapes.unregister("triangle")
    with pytest.raises(ValueError, match="non-empty name"):
        shapes.register("", 1)


def test_the_project_registries_share_it() -> None:
    from image_classification.data.backends import BACKENDS
    from image_classification.dynamic.pedconv.paths import PATH_REGISTRY
    from image_classification.dynamic.registry import OPERATORS
    from image_classification.models import ARCHS

    for registry, member in ((OPERATORS, "pedconv"), (ARCHS, "resnet18"), (BACKENDS, "synthetic"),
                             (PATH_REGISTRY, "fold")):
        assert isinstance(registry, NamedRegistry) and member in registry.names()
    with pytest.raises(ValueError, match="operator 'pedconv' is already registered"):
        from image_classification.dynamic import register_operator

        register_operator("pedconv")(type(OPERATORS["pedconv"].cls.__name__, (OPERATORS["pedconv"].cls,), {}))
