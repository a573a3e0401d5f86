"""image_classification/compat.py: the supported torch range written once and checked at import, and the feature
answers that let one code base run on every torch of the range."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from image_classification import compat
from image_classification.training import engine
from image_classification.training.engine import LoopConfig, compile_ahead_or_eager

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*(torch|torchvision)\s*==\s*(\d+)\.(\d+)", line)
        if match:
            pins[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    return pins


def test_the_range_is_written_once_and_agrees_everywhere() -> None:
    """MIN_TORCH is the oldest torch: pyproject's dependency, the CI leg's pins, the Dockerfile's default image (NGC
    24.12 = torch 2.6) and its comment, and the README all say the same."""
    need = ".".join(map(str, compat.MIN_TORCH))
    need_tv = ".".join(map(str, compat.MIN_TORCHVISION))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={need}"' in pyproject and f'"torchvision>={need_tv}"' in pyproject
    assert _pins(ROOT / "requirements-oldest.txt") == {"torch": compat.MIN_TORCH,
                                                      "torchvision": compat.MIN_TORCHVISION}
    pinned = _pins(ROOT / "requirements.txt")
    assert pinned["torch"] >= compat.MIN_TORCH and pinned["torchvision"] >= compat.MIN_TORCHVISION
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:24.12-py3" in dockerfile  # the container that ships torch 2.6
    assert f"torch >= {need}" in dockerfile
    assert f"torch >= {need}" in (ROOT / "README.md").read_text()
    assert "--oldest-torch" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("version,ok", [("2.6.0", True), ("2.6.0a0+ecf3bae40a.nv25.01", True), ("2.14.1+cpu", True),
                                        ("2.5.1", False), ("2.4.1+cu121", False), ("1.13.1", False)])
def test_version_check_names_installed_and_required(version: str, ok: bool) -> None:
    if ok:
        compat.check_torch_version(version)
        return
    with pytest.raises(ImportError) as info:
        compat.check_torch_version(version)
    message = str(info.value)
    assert "\n" not in message and f"torch {version} is installed" in message and "torch >= 2.6" in message
    assert "pip install 'torch>=2.6'" in message


@pytest.mark.parametrize("version", ["", "2", "dev"])
def test_an_unreadable_version_is_one_line(version: str) -> None:
    with pytest.raises(ImportError, match=rf"cannot read the installed torch's version \({version!r}\); it needs "
                                          r"torch >= 2\.6"):
        compat.check_torch_version(version)
    assert compat.torch_version_tuple("v2.6.0") == (2, 6)  # a prefix is no reason to refuse


@pytest.mark.parametrize("program", ["main.py", "classify.py"])
def test_the_programs_say_an_old_torch_in_one_line(program: str) -> None:
    """main.py printed 13 lines of traceback before the one-line message."""
    code = (f"import sys, runpy, torch; torch.__version__ = '2.4.1'; sys.argv = ['{program}', '--help']\n"
            f"runpy.run_path('{program}', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"{program}: error: image_classification needs torch >= 2.6, but torch 2.4.1 is installed; upgrade it "
        "(pip install 'torch>=2.6') or use an NGC pytorch:24.12-py3 or newer image"], out.stderr


def test_an_old_torch_fails_at_import_in_one_line(tmp_path: Path) -> None:
    """The package's __init__ checks first: on a torch older than the range, `import image_classification` is one
    ImportError naming both versions (simulated by a torch.__version__ patched before the import)."""
    code = ("import torch; torch.__version__ = '2.4.1'\n"
            "try:\n    import image_classification\nexcept ImportError as exc:\n    print('ERR', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR image_classification needs torch >= 2.6, but torch 2.4.1 is installed")


def test_custom_op_resolves_string_annotations() -> None:
    """A custom operator whose annotations are strings (from __future__ import annotations, as in this module):
    torch 2.6's schema inference cannot evaluate them itself."""
    def twice(x: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
        return x * scale, x.clone()

    assert isinstance(twice.__annotations__["x"], str)
    op = compat.custom_op("pedconv_compat_test::twice", twice)
    a, b = op(torch.ones(2), 3.0)
    assert a.tolist() == [3.0, 3.0] and b.tolist() == [1.0, 1.0]


def test_auto_exporter_follows_torchs_own_default() -> None:
    import inspect

    default = inspect.signature(torch.onnx.export).parameters["dynamo"].default
    assert compat.dynamo_onnx_exporter_is_default() is (default is True)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend compiles nothing")


def _setup(model: nn.Module):
    """The training objects compile_ahead_or_eager works on, around ``model`` (no EMA copy)."""
    from image_classification.training.engine import TrainingSetup

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainingSetup(model=model, module=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                         scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))


def test_a_model_torch_compile_cannot_compile_runs_eager_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.exc import TorchDynamoException

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 3, 6, 6))
    reference = model.state_dict()
    model.compile(backend=_failing_backend, dynamic=False)
    real = engine.compile_ahead

    def compile_ahead(*args, **kwargs):
        real(*args, **kwargs)  # the pinned torch raises BackendCompilerFailed here; torch 2.11 falls back by itself
        raise TorchDynamoException("the backend compiled nothing")

    monkeypatch.setattr(engine, "compile_ahead", compile_ahead)
    comp = _setup(model)
    why = compile_ahead_or_eager(comp, LoopConfig(device=torch.device("cpu")), (2, 3, 6, 6), (2, 3, 6, 6))
    assert why is not None and "\n" not in why and why.endswith("; running eager")
    assert f"torch {torch.__version__}" in why
    assert "BackendCompilerFailed" in why or "TorchDynamoException: the backend compiled nothing" in why
    assert model._compiled_call_impl is None  # eager again: the forward runs without the compiler
    y = model(torch.randn(2, 3, 6, 6))
    assert y.shape == (2, 2)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items() if "running" not in k)


def test_a_model_error_is_not_mistaken_for_a_compiler_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    comp = _setup(model)
    with pytest.raises(RuntimeError):  # 5 input channels for a 3-channel conv: eager fails the same way
        compile_ahead_or_eager(comp, LoopConfig(device=torch.device("cpu")), None, (2, 5, 6, 6))


def test_feature_checks_answer_on_this_torch(tmp_path) -> None:  # noqa: ANN001
    import torch

    g = torch.Generator().manual_seed(0)
    bias, a, b = torch.randn(3, generator=g), torch.randn(2, 4, generator=g), torch.randn(4, 3, generator=g)
    torch.testing.assert_close(compat.addmm_relu(bias, a, b, 0.5), torch.relu(bias + 0.5 * a @ b))
    assert compat.any_autocast_enabled() is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compat.any_autocast_enabled() is True
    assert isinstance(compat.cudnn_conv_allows_tf32(), bool)
    assert torch.cuda.OutOfMemoryError in compat.OUT_OF_MEMORY_ERRORS
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, path)
    found = compat.unsafe_globals_in_checkpoint(str(path))
    assert found == [] or (found is None and compat.torch_version_tuple() < (2, 5))


def test_torch_feature_checks_live_in_compat() -> None:
    """No module but compat.py probes torch for an attribute (getattr/hasattr on torch...): every such question is
    asked once, here, where it says why it exists."""
    import re
    from pathlib import Path

    package = Path(compat.__file__).parent
    probes = [f"{path.relative_to(package)}:{number}"
              for path in sorted(package.rglob("*.py")) if path.name != "compat.py"
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if re.search(r"\b(getattr|hasattr)\(torch[.,)]", line)]
    assert probes == []
