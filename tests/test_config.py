"""Every option of every config group composes and instantiates; bad configs fail early, clearly."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_cfg
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ssd_lightning.config import ConfigError, resolvers
from ssd_lightning.config.compose import instantiate_checked
from ssd_lightning.config.paths import config_dir
from ssd_lightning.config.validation import validate_config
from ssd_lightning.core.postprocess import EVALUATE_DEFAULTS, PREDICT_DEFAULTS
from ssd_lightning.training.builders import build, build_callbacks, build_loggers

CONF = ROOT / "conf"
DATA = ROOT / "data"
GROUPS = [
    "data",
    "augmentation",
    "anchors",
    "model",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "hydra",
    "experiment",
    "debug",
]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
HAS_CUDA = torch.cuda.is_available()


def test_every_group_has_options() -> None:
    assert {g for g, _ in OPTIONS} == set(GROUPS)
    assert config_dir() == CONF


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    small = ["model.net.image_size=128"] if group in ("anchors", "model") else []
    # data=coco is every user's own dataset: its paths are theirs to give (the example's here)
    own = [f"data.images_dir={DATA / 'PennFudanPed' / 'PNGImages'}"] if option == "coco" else []
    if own:  # its seeded split is recorded in the run, not beside the repo's train.json
        own += [f"data.train_json={DATA / 'pennfudan_coco' / 'train.json'}"]
        own += [f"data.split_file={tmp_path / 'split.json'}"]
    cfg = make_cfg(
        [
            f"{group}={option}",
            "model.net.weights=none",
            "data.num_workers=0",
            "data.preload=false",
            *small,
            *own,
        ],
        tmp_path / "run",
    )
    validate_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group in ("data", "augmentation"):
        dm = instantiate(cfg.data)
        dm.setup("fit")
        image, target = dm.train_set[0]
        assert image.shape == (3, 300, 300) and len(target["boxes"]) >= 1
    elif group in ("anchors", "model"):
        module = instantiate_checked(cfg.model, "model")
        with torch.no_grad():
            loc, logits = module.net.eval()(torch.rand(1, 3, 128, 128))
        assert loc.shape[1] == logits.shape[1] == module.net.num_anchors
    elif group in ("optimizer", "scheduler"):
        module = instantiate_checked(cfg.model, "model")
        trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False)
        module.trainer = trainer
        trainer.fit_loop.max_epochs = 2
        opt = module.configure_optimizers()
        assert isinstance(
            opt if isinstance(opt, torch.optim.Optimizer) else opt["optimizer"],
            torch.optim.Optimizer,
        )
    elif group in ("logger", "callbacks"):
        loggers = build_loggers(cfg)
        callbacks = build_callbacks(cfg, has_logger=bool(loggers))
        assert option == "none" or loggers or callbacks
    elif group == "paths":
        assert Path(cfg.paths.root_dir) == ROOT
        assert (Path(cfg.paths.data_dir) / "PennFudanPed").is_dir()
    else:  # trainer, experiment, debug, hydra: the Trainer builds (GPU ones need a GPU)
        if cfg.trainer.accelerator == "gpu" and not HAS_CUDA:
            strategy = cfg.trainer.get("strategy")
            if isinstance(strategy, dict | type(cfg.trainer)) and "_target_" in strategy:
                instantiate(strategy)
            return
        instantiate(cfg.trainer, logger=False)


def test_slurm_launcher_config(tmp_path: Path) -> None:
    try:
        plugin = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher")
    except ModuleNotFoundError:
        plugin = None
    if plugin is None:
        pytest.skip("hydra-submitit-launcher not installed (only needed on a SLURM cluster)")
    cfg = make_cfg(["hydra/launcher=slurm"], tmp_path / "run")
    assert cfg.hydra.launcher.tasks_per_node == 4


@pytest.mark.parametrize("name", ["evaluate", "predict"])
def test_tool_configs_compose(name: str, tmp_path: Path) -> None:
    extra = ["input=x.jpg"] if name == "predict" else []
    cfg = make_cfg([f"ckpt_path={tmp_path}/x.ckpt", *extra], tmp_path / "run", config_name=name)
    assert str(cfg.ckpt_path).endswith("x.ckpt") and ("input" in cfg) == (name == "predict")
    assert "task_name" not in cfg  # no tool reads it


def test_default_recipe(tmp_path: Path) -> None:
    cfg = make_cfg([], tmp_path / "run")
    assert cfg.trainer.max_epochs == 320 and cfg.optimizer.lr == 1e-3
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.weight_decay == 0.05
    assert cfg.scheduler._target_ == "ssd_lightning.training.schedules.warmup_cosine"
    assert cfg.model.optimizer == cfg.optimizer and cfg.model.scheduler == cfg.scheduler
    assert cfg.anchors.name == "pennfudan_fitted" and cfg.augmentation.name == "iou_crop"
    assert cfg.data.val_size == 50 and cfg.model.loss.neg_ratio == 4
    assert dict(cfg.model.predict) == {"score_threshold": 0.5, "nms_threshold": 0.45, "top_k": 20}
    assert cfg.model.evaluate.score_threshold == 0.01 and cfg.model.evaluate.top_k == 100
    assert cfg.callbacks.model_checkpoint.monitor == "val/map"
    assert cfg.data.image_size == cfg.model.net.image_size == 300
    assert cfg.model.ema_decay == 0.995
    # the original project had no validation split: the best checkpoint is then by train/loss
    original = make_cfg(["experiment=original"], tmp_path / "run2")
    assert original.data.val_size == 0
    assert original.callbacks.model_checkpoint.monitor == "train/loss"
    assert original.model.ema_decay is None and original.scheduler is None
    assert original.optimizer._target_ == "torch.optim.Adam"
    assert original.optimizer.weight_decay == 0
    # the default before weight decay and iou_crop (the README's Accuracy table compares them)
    previous = make_cfg(["experiment=adam_safe_crop"], tmp_path / "run3")
    assert previous.optimizer._target_ == "torch.optim.Adam"
    assert previous.optimizer.weight_decay == 0
    assert previous.augmentation.name == "safe_crop" and previous.trainer.max_epochs == 360
    assert previous.anchors.name == "tall_skinny"
    assert previous.trainer.check_val_every_n_epoch == 10 and previous.model.ema_decay == 0.995


def test_the_configs_show_the_thresholds_postprocess_owns() -> None:
    # the configs repeat the defaults so that --help and config_resolved.yaml show them; the
    # code's own (core.postprocess) are the ones predict / export fall back to
    model = OmegaConf.load(config_dir() / "model" / "ssd_resnet34.yaml")
    assert OmegaConf.to_container(model.predict) == PREDICT_DEFAULTS
    assert OmegaConf.to_container(model.evaluate) == EVALUATE_DEFAULTS
    evaluate = OmegaConf.to_container(OmegaConf.load(config_dir() / "evaluate.yaml").model.evaluate)
    assert {k: v for k, v in evaluate.items() if k in EVALUATE_DEFAULTS} == {
        k: v for k, v in EVALUATE_DEFAULTS.items() if k in evaluate
    }


def test_precision_follows_the_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bf16-mixed where the device computes bf16 natively (a CPU with AMX / AVX512-BF16 here;
    emulated bf16 would be slower than fp32), else 32-true; an explicit value wins."""
    for native in (True, False):
        monkeypatch.setattr(resolvers, "cpu_has_native_bf16", lambda native=native: native)
        expected = "bf16-mixed" if native else "32-true"
        assert resolvers.auto_precision("cpu") == expected
        cfg = make_cfg(["trainer=cpu"], tmp_path / f"run{native}")
        assert cfg.trainer.precision == expected
    if not torch.cuda.is_available():
        assert resolvers.auto_precision("gpu") == "32-true"
    assert make_cfg(["trainer.precision=32-true"], tmp_path / "r").trainer.precision == "32-true"


@given(epochs=st.integers(1, 2000), validations=st.integers(1, 100))
def test_validation_interval_validates_the_last_epoch_about_n_times(epochs, validations) -> None:
    every = resolvers.validation_interval(epochs, validations)
    assert epochs % every == 0  # so the last epoch is validated
    assert epochs // every >= min(epochs, validations)  # at least the validations asked for
    if epochs < 2 * validations:
        assert every == 1


def test_long_runs_validate_every_few_epochs(tmp_path: Path) -> None:
    """The default run (320 epochs) validates every 10; short runs every epoch; an int wins."""
    assert make_cfg([], tmp_path / "a").trainer.check_val_every_n_epoch == 10
    short = make_cfg(["trainer.max_epochs=20"], tmp_path / "b")
    assert short.trainer.check_val_every_n_epoch == 1
    fixed = make_cfg(["trainer.check_val_every_n_epoch=3"], tmp_path / "c")
    assert fixed.trainer.check_val_every_n_epoch == 3
    assert resolvers.validation_interval(None) == resolvers.validation_interval(-1) == 1


def test_no_callbacks_means_no_checkpoints(tmp_path: Path) -> None:
    """callbacks=none writes no checkpoint: Lightning would add its own ModelCheckpoint (a whole
    training state per epoch under <run dir>/<logger>/checkpoints/) where none is configured."""
    fast = ["model.net.weights=none", "data.preload=false", "trainer=cpu"]
    _, _, trainer = build(make_cfg([*fast, "callbacks=none"], tmp_path / "none"))
    assert trainer.checkpoint_callbacks == []
    _, _, trainer = build(make_cfg(fast, tmp_path / "default"))
    assert trainer.checkpoint_callbacks  # the run's own: best model, last.ckpt


def test_max_steps_is_a_trainer_key(tmp_path: Path) -> None:
    """trainer.max_steps is typed like any trainer key (no `+`), and it is the length the
    open-ended run's refusal asks for: the schedule then spans max_steps."""
    assert make_cfg([], tmp_path / "a").trainer.max_steps == -1
    cfg = make_cfg(["trainer.max_epochs=-1", "trainer.max_steps=3"], tmp_path / "b")
    assert cfg.trainer.max_steps == 3
    validate_config(cfg)


def test_one_mistake_is_one_line_several_are_listed(tmp_path: Path) -> None:
    cfg = make_cfg(["anchors=tall_skinny", "anchors.ratios=[-1.0]"], tmp_path / "a")
    with pytest.raises(ConfigError, match=r"^invalid configuration: anchors\.ratios: ") as one:
        validate_config(cfg)
    assert "\n" not in str(one.value)
    cfg = make_cfg(["anchors.ratios=[-1.0]", "model.net.image_size=8"], tmp_path / "b")
    with pytest.raises(ConfigError) as several:
        validate_config(cfg)
    lines = str(several.value).splitlines()
    assert lines[0] == "invalid configuration:" and len(lines) == 3
    assert all(line.startswith("  - ") for line in lines[1:])


def test_clipping_a_fused_optimizer_in_mixed_precision_is_refused(tmp_path: Path) -> None:
    """Lightning would stop at the first step; the experiments that clip use unfused optimizers."""
    bf16 = ["trainer.precision=bf16-mixed", "model.net.weights=none", "data.preload=false"]
    cfg = make_cfg([*bf16, "trainer.gradient_clip_val=5"], tmp_path / "run")
    with pytest.raises(ConfigError, match="optimizer.fused=false"):
        validate_config(cfg)
    for experiment in ("scratch", "sgd_cosine"):
        validate_config(make_cfg([*bf16, f"experiment={experiment}"], tmp_path / experiment))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("anchors=tall_skinny anchors.ratios=[0.5,-1.0]", "anchors.ratios"),
        ("anchors=tall_skinny anchors.ratios=[0.5,0.0]", "> 0"),
        ("anchors=tall_skinny anchors.scales=[0.1,0.2,0.4,0.6]", "6"),
        ("anchors=tall_skinny anchors.ratios=[[0.5],[0.5]]", "anchors.ratios"),
        ("model.net.head_kernel_size=2", "1 or 3"),
        ("model.net.weights=/no/such/file.pth", "auto | imagenet | none"),
        ("model.net.num_classes=1", "model.net.num_classes"),
        ("model.predict.score_threshold=1.5", "model.predict.score_threshold"),
        ("model.evaluate.top_k=0", "model.evaluate.top_k"),
        ("optimizer.lr=-0.1", "optimizer: Invalid learning rate"),
        ("trainer.max_epochs=-1", "scheduler=none"),
        ("model.loss.beta=0", "model.loss.beta"),
        ("model.max_nonfinite_steps=0", "model.max_nonfinite_steps"),
        ("model.ema_decay=1.0", "model.ema_decay=1.0: allowed values"),
        ("data.val_size=170", "data.val_size"),
        ("data.verify=sometimes", "data.verify"),
        ("augmentation.crop.type=bogus", "augmentation.crop.type"),
        ("callbacks.prediction_images.every_n_epochs=0", "every_n_epochs"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.image_size=256", "data.image_size"),
        ("model.net.image_size=-1", "model.net.image_size=-1: allowed values are integers >= 64"),
        ("model.net.image_size=10", "model.net.image_size=10"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path"),
        # read before any constructor checks them: a traceback deep in the fit otherwise
        ("seed=abc", "seed='abc': allowed values are integers >= 0"),
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc': allowed values are integers"),
        ("trainer.max_steps=1.5", "trainer.max_steps=1.5"),
        ("optimizer.lr=abc", "optimizer.lr='abc': allowed values are numbers"),
    ],
)
def test_bad_values_are_named(override: str, expected: str, tmp_path: Path) -> None:
    """Whichever check catches it (a constructor or the cross-field validation), a bad value
    stops the build with a ConfigError naming the key, before anything is trained."""
    overrides = ["model.net.weights=none", "data.preload=false", *override.split()]  # "a=1 b=2"
    cfg = make_cfg(overrides, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert expected in str(err.value)


def test_unknown_preset_lists_the_options(tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException) as err:
        make_cfg(["anchors=nope"], tmp_path / "run")
    assert "tall_skinny" in str(err.value) and "ssd" in str(err.value)


def test_constructor_errors_become_config_errors() -> None:
    """A ValueError raised by a constructor reaches the user as a ConfigError naming the key,
    not as Hydra's InstantiationException traceback."""
    node = OmegaConf.create({"_target_": "ssd_lightning.core.loss.MultiBoxLoss", "neg_ratio": -1})
    with pytest.raises(ConfigError, match=r"^model\.loss\.neg_ratio=-1: allowed"):
        instantiate_checked(node, "model.loss")
    node = OmegaConf.create({"_target_": "torch.nn.Dropout", "p": 2.0})
    with pytest.raises(ConfigError, match=r"^model\.head: "):  # a message without a key gets one
        instantiate_checked(node, "model.head")


def test_config_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "conf"
    shutil.copytree(CONF, other)
    monkeypatch.setenv("SSD_LIGHTNING_CONF_DIR", str(other))
    assert config_dir() == other
    monkeypatch.setenv("SSD_LIGHTNING_CONF_DIR", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="SSD_LIGHTNING_CONF_DIR"):
        config_dir()
