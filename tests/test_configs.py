"""Every recipe under configs/ loads through main.py's parser and builds its model (no training).

Models are built at their real size but with 10 classes, without a forward pass (ResNet-50 with
CondConv is ~100M parameters: building is cheap, running it on CPU in CI is not); the Fashion-MNIST
recipes of the quickstart (static, pedconv) also run one forward pass.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import yaml

from image_classification.dynamic import parse_spec
from image_classification.models import build_model, list_archs, parse_placement
from image_classification.tools import train_detection as det_train
from image_classification.tools import train_segmentation as seg_train
from image_classification.training.cli import build_parser, parse_args
from image_classification.training.config import load_config, read_recipe_chain

ROOT = Path(__file__).resolve().parents[1]
# detection/segmentation recipes (Tables 2-3) belong to their own scripts: tests/dense/test_recipes.py
DENSE_TABLES = {"pedconv_table2", "pedconv_table3"}
# configs/<folder>/_base.yaml holds what the recipes of its folder share (``base: _base.yaml``); not a run itself
ALL_RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("_"))
BASES = sorted((ROOT / "configs").rglob("_*.yaml"))
CONFIGS = [p for p in ALL_RECIPES if p.parent.name not in DENSE_TABLES]
SNAPSHOT = Path(__file__).resolve().parent / "recipe_snapshot.json"
# first line of a recipe: "Title, Venue Year, Table N" (or Sec./Fig./the authors' released code), or this
# project's own Fashion-MNIST study
CITATION = re.compile(r"^# (PEDConv, BMVC 2021, (appendix Sec\. [A-F](-[A-F] \(|, ))?(Table \d|Sec\. \d|Fig\. \d|"
                      r"the authors' released code \(PEDConv repository\))|DCD, ICLR 2021, Table \d|"
                      r"ODConv, ICLR 2022, Table \d|Fashion-MNIST small-data study)")


# Files that are not in this repository (the papers' text and notes about the authors' code kept next to it while
# it was written): cite "PEDConv, BMVC 2021, Eq. 2; Table 5b", "DCD, ICLR 2021, Eq. 6" or "the authors' released code
# (PEDConv repository)" instead. Built from parts so that this file does not name them itself.
_ABSENT = ("REFERENCE", "pedconv_paper", "pedconv_appendix", "pedconv_authors_readme", "README_authors", "dcd_paper",
           "condconv_involution_report")
ABSENT_FILE = re.compile(r"\b(" + "|".join(_ABSENT) + r")\.md\b|\bshared" + "/" + r"(papers|REFERENCE)\b")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".json"}
SKIPPED_DIRS = {"logs", "__pycache__", "build", "dist"}


def _repository_text_files() -> list:
    files = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any((p.startswith(".") and p != ".ci") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in ("Dockerfile", "run")):
            files.append(path)
    return files


def test_no_file_cites_a_file_outside_the_repository() -> None:
    files = _repository_text_files()
    assert ROOT / "README.md" in files and ROOT / "configs" / "pedconv_table1" / "_base.yaml" in files
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for path in files
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if ABSENT_FILE.search(line)]
    assert not hits, "cite the paper by short title, section, equation and table instead:\n" + "\n".join(hits)


def test_docs_links_resolve() -> None:
    """Every docs/... file that README.md and docs/ name exists."""
    texts = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    named = {m for path in texts for m in re.findall(r"\bdocs/[\w./-]+\.(?:md|csv|png)", path.read_text())}
    assert named and not sorted(n for n in named if not (ROOT / n).is_file())


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


def test_every_paper_table_has_recipes() -> None:
    tables = {p.parent.name for p in CONFIGS}
    assert {"pedconv_table1", "pedconv_table4", "pedconv_table5", "pedconv_appendix", "pedconv_authors",
            "dcd_table4", "fashion_mnist"} <= tables
    names = {_id(p) for p in CONFIGS}
    for needed in ("pedconv_table1/resnet18_pedconv.yaml", "pedconv_table1/resnet50_static.yaml",
                   "pedconv_table1/mobilenet_v2_pedconv.yaml", "pedconv_table1/efficientnet_b0_pedconv.yaml",
                   "pedconv_authors/resnet18_pedconv.yaml", "dcd_table4/resnet18_dyconv.yaml",
                   "dcd_table4/mobilenet_v2_x1.0_condconv.yaml", "fashion_mnist/static.yaml"):
        assert needed in names


def merged_recipe(path: Path) -> Dict[str, Any]:
    """A recipe's keys as written (dashes), its ``base:`` chain applied."""
    merged: Dict[str, Any] = {}
    for recipe in read_recipe_chain(str(path), pytest.fail):
        merged.update({str(key).replace("_", "-"): value for key, value in recipe.values.items()})
    return merged


@pytest.mark.parametrize("path", CONFIGS + [b for b in BASES if b.parent.name not in DENSE_TABLES], ids=_id)
def test_recipe_has_citation_and_known_keys(path: Path) -> None:
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("# ") and CITATION.search(first), f"{path}: first line must cite its source"
    content = yaml.safe_load(text)
    assert isinstance(content, dict) and content
    long_flags = {opt[2:] for action in build_parser()._actions for opt in action.option_strings
                  if opt.startswith("--")}
    assert set(content) - {"base"} <= long_flags, f"unknown keys: {set(content) - long_flags - {'base'}}"


def test_one_base_per_folder_and_no_restated_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each configs/ folder has one _base.yaml that every recipe of it names; neither restates a value it would
    get anyway (the base: main.py's default; a recipe: its base's or the default), except ``arch`` and ``conv``,
    which every recipe states because they say what it is."""
    monkeypatch.chdir(ROOT)
    folders = sorted({p.parent for p in ALL_RECIPES})
    assert sorted(b.parent for b in BASES) == folders and all(b.name == "_base.yaml" for b in BASES)
    parsers = {"pedconv_table2": det_train.build_parser, "pedconv_table3": seg_train.build_parser}
    for folder in folders:
        parser = parsers.get(folder.name, build_parser)()
        defaults = {a.dest: a.default for a in parser._actions}
        flag_dest = {o[2:]: a.dest for a in parser._actions for o in a.option_strings if o.startswith("--")}
        base = load_config(parser, str(folder / "_base.yaml"))
        restated = sorted(k for k, v in base.items() if v == defaults[k])
        assert not restated, f"{folder.name}/_base.yaml restates main.py's defaults: {restated}"
        for path in sorted(folder.glob("[!_]*.yaml")):
            chain = read_recipe_chain(str(path), pytest.fail)
            assert [Path(f.path).name for f in chain] == ["_base.yaml", path.name], f"{_id(path)}: base: _base.yaml"
            own = load_config(parser, str(path))  # with the base: compare each own key with what it would inherit
            names = {flag_dest[str(key).replace("_", "-")] for key in chain[-1].values}
            restated = sorted(d for d in names if d not in ("arch", "conv") and own[d] == base.get(d, defaults[d]))
            assert not restated, f"{_id(path)} restates what it inherits: {restated}"


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_recipe_parses_and_builds(path: Path, tmp_path: Path) -> None:
    args = parse_args(["/data", "--config", str(path), "--workspace", str(tmp_path)])
    content = merged_recipe(path)
    # the recipe's values reach the namespace (spot checks of the paper hyper-parameters)
    assert args.arch == content["arch"] and args.arch in list_archs()
    assert args.lr == pytest.approx(float(content.get("lr", build_parser().get_default("lr"))))
    assert args.epochs == content["epochs"]
    assert str(parse_spec(args.conv)) == str(parse_spec(content["conv"]))
    parse_placement(args.placement)
    small = args.dataset == "fashion-mnist"
    runs_forward = small and path.stem in ("static", "pedconv")  # the quickstart's two models also run a forward
    with torch.device("cpu" if runs_forward else "meta"):  # meta: shapes and modules without filling weights
        model = build_model(args.arch, conv=args.conv, placement=args.placement, num_classes=10,
                            in_chans=1 if small else 3, init=args.model_config)
    if args.conv != "static":
        assert any(type(m).__module__.startswith("image_classification.dynamic") for m in model.modules())
    if runs_forward:
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, 1, args.image_size, args.image_size))
        assert out.shape == (2, 10)


def test_paper_hyperparameters() -> None:
    """The numbers the papers state, read back through the parser."""
    cfg = ROOT / "configs"

    def parsed(name: str):
        return parse_args(["/data", "--config", str(cfg / name)])

    r18 = parsed("pedconv_table1/resnet18_pedconv.yaml")
    assert (r18.lr, r18.weight_decay, r18.momentum, r18.epochs, r18.lr_schedule, r18.optimizer_batch_size) == (
        0.512, 1e-4, 0.9, 120, "cosine", 512)
    mb = parsed("pedconv_table1/mobilenet_v2_pedconv.yaml")
    assert (mb.lr, mb.weight_decay, mb.epochs) == (0.1, 4e-5, 250)
    auth = parsed("pedconv_authors/resnet18_pedconv.yaml")
    assert (auth.lr, auth.warmup, auth.momentum, auth.weight_decay, auth.mixup, auth.label_smoothing,
            auth.model_config, auth.epochs, auth.batch_size, auth.optimizer_batch_size) == (
        0.512, 8, 0.875, 3.0517578125e-05, 0.2, 0.1, "fanin", 250, 64, 512)
    dcd_r = parsed("dcd_table4/resnet18_dcd.yaml")
    assert ((dcd_r.lr, dcd_r.lr_schedule, dcd_r.lr_steps, dcd_r.lr_decay, dcd_r.epochs)
            == (0.1, "step", [30, 60, 90], 0.1, 100))
    dcd_m = parsed("dcd_table4/mobilenet_v2_x1.0_dcd.yaml")
    assert (dcd_m.lr, dcd_m.lr_schedule, dcd_m.weight_decay, dcd_m.epochs) == (0.05, "cosine", 2e-5, 300)
    assert parse_spec(parsed("dcd_table4/resnet18_dyconv.yaml").conv).options["k"] == 4
    assert parse_spec(parsed("dcd_table4/mobilenet_v2_x1.0_condconv.yaml").conv).options["k"] == 8
    assert parse_spec(parsed("pedconv_table5/b_resnet18_rank8.yaml").conv).options["rank"] == 8
    assert parse_spec(parsed("pedconv_table5/infomax_resnet50_off.yaml").conv).options["infomax"] is False
    # EfficientNet's published recipe (EfficientNet, Sec. 5.2 and its TF code) at PEDConv's batch of 512
    for name in ("static", "pedconv", "condconv"):
        eff = parsed(f"pedconv_table1/efficientnet_b0_{name}.yaml")
        assert (eff.optimizer, eff.optimizer_eps, eff.rmsprop_alpha, eff.momentum, eff.nesterov) == (
            "rmsprop", 1e-3, 0.9, 0.9, False)
        assert eff.lr == pytest.approx(0.016 * eff.optimizer_batch_size / 256) and eff.optimizer_batch_size == 512
        assert (eff.lr_schedule, eff.lr_decay, eff.lr_decay_epochs, eff.warmup, eff.epochs) == (
            "exponential", 0.97, 2.4, 5, 350)
        assert eff.use_ema == pytest.approx(0.9999 ** (512 / 4096))
        assert (eff.weight_decay, eff.label_smoothing, eff.dropout, eff.drop_path, eff.bn_momentum) == (
            1e-5, 0.1, 0.2, 0.2, 0.01)
        assert (eff.augmentation, eff.interpolation) == ("autoaugment", "bicubic")
    # Table 4: free adversarial training as Shafahi et al. 2019 trained ImageNet ResNet-50 (m = 4, eps = 4)
    for name in ("static", "pedconv"):
        adv = parsed(f"pedconv_table4/resnet50_{name}.yaml")
        assert (adv.adv_train, adv.adv_replays, adv.adv_eps, adv.adv_step_size) == ("free", 4, 4.0, 4.0)
        assert (adv.lr, adv.optimizer_batch_size, adv.weight_decay, adv.bn_weight_decay) == (0.1, 256, 1e-4, True)
        assert (adv.epochs, adv.lr_schedule, adv.lr_steps, adv.lr_decay) == (math.ceil(90 / 4), "step", [8, 16], 0.1)
        assert adv.conv == name and adv.mixup == 0


def test_command_line_overrides_recipe(tmp_path: Path) -> None:
    path = ROOT / "configs" / "pedconv_table1" / "resnet18_pedconv.yaml"
    args = parse_args(["/data", "--config", str(path), "--epochs", "3", "-b", "8", "--optimizer-batch-size", "8"])
    assert (args.epochs, args.batch_size, args.lr) == (3, 8, 0.512)


def resolved_namespace(path: Path) -> Dict[str, Any]:
    """Every argument of the run a recipe builds (its script's parser, validated), JSON-normalised; ``config``
    (the file name itself) left out."""
    parse = {"pedconv_table2": det_train.parse_args, "pedconv_table3": seg_train.parse_args}.get(
        path.parent.name, parse_args)
    args = vars(parse(["/data", "--config", str(path)]))
    args.pop("config", None)
    return json.loads(json.dumps(args, sort_keys=True))


def test_resolved_recipes_match_snapshot(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every recipe still builds exactly the run recorded in tests/recipe_snapshot.json (the full argument
    namespace). A deliberate change to a recipe is recorded with
    ``pytest tests/test_configs.py --update-recipe-snapshot``. Flags added to a parser later are accepted when the
    recipe leaves them at their default."""
    monkeypatch.chdir(ROOT)  # recipes name workspaces relative to the repository root
    current = {_id(p): resolved_namespace(p) for p in ALL_RECIPES}
    if request.config.getoption("--update-recipe-snapshot"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(SNAPSHOT.read_text())
    assert sorted(current) == sorted(recorded), "recipes added or removed: update the snapshot"
    defaults = {"main": vars(build_parser().parse_args(["/data"])),
                "pedconv_table2": vars(det_train.build_parser().parse_args(["/data"])),
                "pedconv_table3": vars(seg_train.build_parser().parse_args(["/data"]))}
    for name, args in current.items():
        want = recorded[name]
        changed = {k: (want.get(k), args.get(k)) for k in set(want) | set(args) if want.get(k, ...) != args.get(k, ...)}
        parser_defaults = defaults.get(name.split("/")[0], defaults["main"])
        new_flags_at_default = {k for k, (old, new) in changed.items()
                                if k not in want and json.loads(json.dumps(parser_defaults.get(k))) == new}
        for key in new_flags_at_default:
            del changed[key]
        assert not changed, f"{name}: resolved arguments changed (recorded, now): {changed}"
