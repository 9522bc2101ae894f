"""Training end to end on the real data: fast_dev_run, outputs, resume, sweeps, DDP, TensorBoard."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import make_cfg, run_cli, tiny
from omegaconf import OmegaConf
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.data import DataLoader

from ssd_lightning.config.errors import ConfigError
from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.core.ssd import SSD
from ssd_lightning.evaluate import evaluate
from ssd_lightning.train import train
from ssd_lightning.training.checkpoint import CheckpointError, load_model
from ssd_lightning.training.run_outputs import run_tags


def _finite(metrics: dict, *keys: str) -> None:
    for k in keys:
        assert k in metrics, f"{k} missing from {sorted(metrics)}"
        assert math.isfinite(metrics[k]), f"{k}={metrics[k]}"


def test_fast_dev_run_default_model(tmp_path: Path) -> None:
    """debug=fdr on the real data with the default 300 px model."""
    cfg = make_cfg(
        [
            "debug=fdr",
            "model.net.weights=none",
            "data.batch_size=2",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert metrics["global_step"] == 1
    _finite(
        metrics,
        "train/loss",
        "train/loss_box",
        "train/loss_cls",
        "train/num_pos",
        "train/accuracy",
        "train/box_mae",
        "train/fallback_rate",
        "val/loss",
        "val/map_50",
    )
    assert metrics["train/num_pos"] > 0


def test_bf16_on_the_cpu(tmp_path: Path) -> None:
    """trainer.precision=bf16-mixed on a CPU (what auto picks on one with AMX), with the scratch
    recipe (AdamW, warm-up cosine, gradient clipping): the network trains in channels_last (the
    fast layout for bf16 there) to finite fp32 weights, and the exported model detects in fp32."""
    run = tmp_path / "run"
    metrics = train(make_cfg(tiny("experiment=scratch", "trainer.precision=bf16-mixed"), run))
    _finite(metrics, "train/loss", "val/loss")
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    conv = state["state_dict"]["net.backbone.stem.0.weight"]
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)
    net, _ = load_model(run / "ssd_resnet34_best.pt")
    (det,) = net.detect(torch.rand(1, 3, 128, 128))
    assert det["boxes"].dtype == torch.float32


def test_run_dir_contents(tiny_run: dict) -> None:
    run: Path = tiny_run["dir"]
    assert (run / "config_resolved.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["global_step"] == 4 and saved["best_monitor"] == "val/map"
    assert saved["status"] == "completed" and saved["tags"] == ["tiny", "ci"]
    _finite(saved, "train/loss", "val/loss", "val/map", "val/map_50", "val/map_75", "val/mar_100")
    # the exported best model loads without Lightning and records where it comes from
    best = run / "ssd_resnet34_best.pt"
    assert saved["best_model_path"] == str(best)
    net, info = load_model(best)
    assert info["epoch"] == saved["best_epoch"] and info["monitor"] == "val/map"
    assert net.image_size == 128 and net.config["anchors"]["name"] == "pennfudan_fitted"


def test_tensorboard_events(tiny_run: dict) -> None:
    acc = ea.EventAccumulator(
        str(tiny_run["dir"] / "tensorboard"),
        size_guidance={ea.IMAGES: 0, ea.SCALARS: 0, ea.TENSORS: 0},
    )
    acc.Reload()
    tags = acc.Tags()
    for tag in [
        "train/loss_epoch",
        "train/loss_box",
        "train/loss_cls",
        "train/num_pos",
        "train/accuracy",
        "train/box_mae",
        "train/fallback_rate",
        "val/loss",
        "val/map",
        "val/map_50",
        "val/map_75",
        "val/mar_100",
        "lr-AdamW",
    ]:
        assert tag in tags["scalars"], tag
    assert len(acc.Scalars("val/map_50")) == 2  # one per epoch
    assert "val/predictions" in tags["images"]
    images = acc.Images("val/predictions")
    assert len(images) == 2 and images[0].width > 128  # a grid of 2 drawn images
    assert "data/augmentations/0" in tags["images"]
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["anchors"].string_value == "pennfudan_fitted"
    assert hp["augmentation"].string_value == "iou_crop"
    assert hp["anchor_ratios"].string_value == "pairs"
    assert hp["lr"].number_value == pytest.approx(1e-3)
    assert hp["batch_size"].number_value == 2
    assert hp["backbone_weights"].string_value.startswith("none")
    assert hp["tags"].string_value == "tiny,ci"  # one string: TensorBoard's filter matches it
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in exp.experiment.metric_infos}
    assert {"val/map_50", "val/map"} <= metric_tags


def test_tags_are_a_list_of_words() -> None:
    assert run_tags(OmegaConf.create({"tags": "baseline"})) == ["baseline"]
    assert run_tags(OmegaConf.create({"tags": ["a", 2]})) == ["a", "2"]
    assert run_tags(OmegaConf.create({})) == []
    with pytest.raises(ConfigError, match=r"tags: a list of words, e.g. tags=\[baseline,v2\]"):
        run_tags(OmegaConf.create({"tags": {"a": 1}}))


def test_run_switches_are_checked_before_the_fit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="test_after_fit: true or false, got 'maybe'"):
        train(make_cfg(tiny(test_after_fit="maybe"), tmp_path / "a"))
    with pytest.raises(ConfigError, match="extras.print_config: true or false, got 1"):
        train(make_cfg(tiny("extras.print_config=1"), tmp_path / "b"))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_test_after_fit_equals_evaluate(tiny_run: dict, tmp_path: Path) -> None:
    """test_after_fit wrote what `python -m ssd_lightning.evaluate ckpt_path=<best.pt>` writes
    for the run's data (composed from evaluate.yaml as the CLI does): the whole validation split,
    although the run validated one batch per epoch."""
    best = tiny_run["dir"] / "ssd_resnet34_best.pt"
    after_fit = json.loads((tiny_run["dir"] / "eval_metrics.json").read_text())
    cfg = make_cfg(
        # the run's batch size, workers and precision (TINY pins 32-true)
        [
            f"ckpt_path={best}",
            "data.batch_size=2",
            "data.num_workers=0",
            "trainer.precision=32-true",
        ],
        tmp_path,
        "evaluate",
    )
    cli = json.loads(json.dumps(evaluate(cfg)))  # as written: -1 stays, NaN would be null
    assert after_fit["split"] == "val" and after_fit["num_images"] == 50
    assert after_fit["checkpoint"] == str(best)
    assert after_fit.keys() == cli.keys()
    for key, value in cli.items():  # numbers equal up to float noise, the rest exactly
        expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
        assert after_fit[key] == expected, key


def test_evaluate_computes_val_loss_with_the_models_own_loss(
    tiny_run: dict, tmp_path: Path
) -> None:
    """The loss travels with the model (.ckpt and .pt): evaluate's val/loss is the run's loss
    (model.loss=null, the default), not the design's, unless the user names another."""
    run = tiny_run["dir"]
    _, info = load_model(run / "ssd_resnet34_best.pt")
    _, ckpt_info = load_model(run / "checkpoints" / "last.ckpt")
    assert info["loss"] == ckpt_info["loss"] == MultiBoxLoss().config
    # the same weights as if trained with an IoU loss
    blob = torch.load(run / "ssd_resnet34_best.pt", weights_only=True)
    giou = {**blob["loss"], "box_loss": "giou", "box_weight": 5.0}
    torch.save({**blob, "loss": giou}, tmp_path / "giou.pt")
    args = ["data.batch_size=2", "data.num_workers=0", "trainer.precision=32-true"]

    def val_loss(ckpt: Path, *extra: str) -> float:
        out = tmp_path / f"{ckpt.stem}{len(extra)}"
        cfg = make_cfg([f"ckpt_path={ckpt}", *args, *extra], out, "evaluate")
        return evaluate(cfg, show=lambda _: None)["val/loss"]

    stored = val_loss(tmp_path / "giou.pt")
    named = "model.loss={_target_: ssd_lightning.core.loss.MultiBoxLoss, box_loss: giou}"
    assert stored == pytest.approx(val_loss(run / "ssd_resnet34_best.pt", named), rel=1e-5)
    design = json.loads((run / "eval_metrics.json").read_text())["val/loss"]
    assert stored != pytest.approx(design, rel=1e-3)
    # a file whose stored loss is broken: one message naming the file, not a traceback
    torch.save({**blob, "loss": {**giou, "box_loss": "l2"}}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken.pt: its stored loss .*box_loss='l2'"):
        val_loss(tmp_path / "broken.pt")


def test_resume_continues_exactly(tiny_run: dict, tmp_path: Path) -> None:
    """ckpt_path=: resume from another run's checkpoint into a new run dir."""
    last = tiny_run["dir"] / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    assert before["global_step"] == 4
    metrics = train(
        make_cfg(tiny(f"ckpt_path={last}", trainer__max_epochs=3), tmp_path / "resumed")
    )
    assert metrics["global_step"] == 6  # 2 epochs x 2 steps before, 1 epoch x 2 steps now
    after = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert after["epoch"] == 2 and after["global_step"] == 6
    # Adam's step counter continued from the checkpoint (optimizer state restored, not fresh)
    adam_state = next(iter(after["optimizer_states"][0]["state"].values()))
    assert int(adam_state["step"]) == 6
    # the best so far came along: the new run dir has the best of all 3 epochs
    best = tmp_path / "resumed" / "ssd_resnet34_best.pt"
    assert metrics["best_model_path"] == str(best)
    _, info = load_model(best)
    assert info["epoch"] == metrics["best_epoch"] <= 2


def test_no_validation_split_uses_train_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    best_state = tmp_path / "run" / "checkpoints" / "best.ckpt"  # the full state kept too
    cfg = make_cfg(
        tiny(
            "data.val_size=0",
            "test_after_fit=true",
            f"callbacks.model_checkpoint.checkpoint={best_state}",
            trainer__limit_train_batches=1,
        ),
        tmp_path / "run",
    )
    assert cfg.callbacks.model_checkpoint.monitor == "train/loss"
    assert cfg.callbacks.model_checkpoint.mode == "min"
    with caplog.at_level(logging.INFO, logger="ssd_lightning.train"):
        metrics = train(cfg)
    assert metrics["best_monitor"] == "train/loss"
    assert Path(metrics["best_model_path"]).is_file()
    assert "val/map_50" not in metrics
    assert (tmp_path / "run" / "ssd_resnet34_best.pt").is_file()
    assert "test_after_fit: skipped, no validation split (data.val_size=0)" in caplog.text
    assert not (tmp_path / "run" / "eval_metrics.json").exists()
    full = torch.load(best_state, map_location="cpu", weights_only=True)
    assert full["optimizer_states"] and full["epoch"] == metrics["best_epoch"]


@pytest.mark.parametrize(
    ("changes", "steps"),
    [
        pytest.param({"data__batch_size": 1}, 2, id="batch-size-1"),
        # 121 training images at batch 40: the epoch ends with a batch of one image
        pytest.param(
            {
                "data__batch_size": 40,
                "data__val_size": 49,
                "trainer__limit_train_batches": "null",
                "model__net__image_size": 64,
            },
            4,
            id="last-batch-of-one",
        ),
    ],
)
def test_any_batch_size_trains(tmp_path: Path, changes: dict, steps: int) -> None:
    """A batch of one image reaches the 1x1 maps of the extra blocks, where BatchNorm has a
    single value per channel."""
    metrics = train(make_cfg(tiny("logger=none", **changes), tmp_path / "run"))
    assert metrics["global_step"] == steps and metrics["status"] == "completed"
    _finite(metrics, "train/loss", "val/loss")


class _NaNLoss(MultiBoxLoss):
    """MultiBoxLoss whose total is NaN on chosen calls."""

    def __init__(self, nan_calls: set[int]):
        super().__init__()
        self.nan_calls, self.calls = nan_calls, 0

    def forward(self, *args):
        out = super().forward(*args)
        if self.calls in self.nan_calls:
            out.total = out.total * float("nan")
        self.calls += 1
        return out


def _synthetic_batches(n: int = 4) -> list:
    from ssd_lightning.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    return [
        Batch(
            images=torch.rand(2, 3, 64, 64, generator=g),
            boxes=torch.tensor([[[10.0, 4.0, 30.0, 60.0]], [[30.0, 10.0, 50.0, 50.0]]]),
            labels=torch.ones(2, 1, dtype=torch.int64),
            mask=torch.ones(2, 1, dtype=bool),
            orig_sizes=torch.tensor([[64, 64], [64, 64]]),
            names=["a", "b"],
            fallback=torch.zeros(2, dtype=torch.int64),
        )
        for _ in range(n)
    ]


def _synthetic_loader(n: int = 4) -> DataLoader:
    return DataLoader(_synthetic_batches(n), batch_size=None)


def _fit_with_nan(
    nan_calls: set[int],
    max_nonfinite_steps: int = 10,
    fused: bool = True,
    ema_decay: float | None = None,
    optimizer=None,
):
    import lightning as L

    from ssd_lightning.training.lit_module import SSDLitModule

    torch.manual_seed(0)
    net = SSD(
        {
            "name": "tall_skinny",
            "scales": [0.1, 0.2, 0.375, 0.55, 0.725, 0.9, 1.075],
            "ratios": [0.5, 0.33, 0.25],
            "extra_square": True,
        },
        image_size=64,
        weights="none",
    )
    module = SSDLitModule(
        net,
        _NaNLoss(nan_calls),
        max_nonfinite_steps=max_nonfinite_steps,
        optimizer=optimizer or (lambda params: torch.optim.Adam(params, fused=fused)),
        ema_decay=ema_decay,
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return module, before, trainer


def _assert_same_state(net: SSD, expected: dict) -> None:
    state = net.state_dict()
    assert state.keys() == expected.keys()
    for k, v in state.items():  # parameters and buffers (BatchNorm statistics and counters)
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


def _nan_images(batch):
    return dataclasses.replace(batch, images=torch.full_like(batch.images, float("nan")))


@pytest.mark.parametrize("where", ["loss", "forward"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-no-sync", "sync"])
def test_a_skipped_step_leaves_no_trace(fused: bool, where: str) -> None:
    """A non-finite step (a NaN loss; or NaN activations, which reach BatchNorm's running
    statistics in the forward, before the step is judged) changes no parameter and no buffer:
    the run ends exactly as if the bad batch had not been there."""
    good = _synthetic_batches(4)

    def fit(bad_steps: set[int], batches: list):
        if where == "forward":
            batches = [_nan_images(b) if i in bad_steps else b for i, b in enumerate(batches)]
        module, before, trainer = _fit_with_nan(
            bad_steps if where == "loss" else set(), fused=fused
        )
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        assert module.nonfinite_total == len(bad_steps)
        return module, before

    module, _ = fit({1}, good)
    reference, _ = fit(set(), good[:1] + good[2:])
    _assert_same_state(module.net, reference.net.state_dict())
    module, before = fit({0, 1, 2, 3}, good)  # every step bad: the initial network
    _assert_same_state(module.net, before)


def test_a_skipped_first_step_leaves_sgd_momentum_sound() -> None:
    """Fused SGD creates its momentum buffers uninitialized on the first step, and a skipped
    first step never fills them: the next step would then add garbage to the weights."""

    def sgd(params):
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, fused=True)

    good = _synthetic_batches(3)
    module, _, trainer = _fit_with_nan({0}, optimizer=sgd)
    trainer.fit(module, train_dataloaders=DataLoader(good, batch_size=None))
    assert module.nonfinite_total == 1
    reference, _, trainer = _fit_with_nan(set(), optimizer=sgd)
    trainer.fit(reference, train_dataloaders=DataLoader(good[1:], batch_size=None))
    _assert_same_state(module.net, reference.net.state_dict())


@pytest.mark.parametrize("fused", [True, False], ids=["fused-no-sync", "sync"])
def test_a_skipped_step_leaves_the_moving_average_alone(fused: bool) -> None:
    """With model.ema_decay (the default recipe) the average of the weights is part of the
    trained state too: a skipped step does not move it."""
    import lightning as L

    module, _, trainer = _fit_with_nan({1}, fused=fused, ema_decay=0.9)
    seen: list[dict[str, torch.Tensor]] = []

    class Spy(L.Callback):  # the whole state when a batch starts: the previous one is done
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Spy())
    trainer.fit(module, train_dataloaders=_synthetic_loader(3))
    assert module.nonfinite_total == 1
    before, after = seen[1], seen[2]  # the state around the skipped step (the second)
    assert any(k.startswith("ema.net.") for k in after)
    for k, v in after.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-no-sync", "sync"])
def test_nonfinite_loss_stops_when_persistent(fused: bool) -> None:
    from ssd_lightning.training.lit_module import NonFiniteLossError

    module, _, trainer = _fit_with_nan({0, 1, 2, 3}, max_nonfinite_steps=3, fused=fused)
    with pytest.raises(NonFiniteLossError, match="[34] consecutive steps"):
        trainer.fit(module, train_dataloaders=_synthetic_loader())


def test_multirun_over_anchors(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = run_cli(
        "ssd_lightning.train",
        "-m",
        "anchors=tall_skinny,ssd",
        *tiny(trainer__limit_train_batches=1),
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert r.returncode == 0, r.stderr[-4000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, anchors in zip(jobs, ["tall_skinny", "ssd"], strict=True):
        d = sweep / job
        assert (d / ".hydra" / "config.yaml").is_file() and (d / "checkpoints/last.ckpt").is_file()
        assert list((d / "tensorboard").glob("events.out.tfevents.*"))
        _finite(json.loads((d / "metrics.json").read_text()), "train/loss", "val/map_50")
        assert f"name: {anchors}" in (d / "config_resolved.yaml").read_text()
    assert not (tmp_path / "logs").exists()


def test_ddp_cpu_two_processes_one_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_cli(
        "ssd_lightning.train",
        "trainer=ddp_cpu",
        *tiny("data.val_size=4", test_after_fit="true"),
        f"hydra.run.dir={run}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stray dirs from rank 1
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran inside the parent's run dir
    metrics = json.loads((run / "metrics.json").read_text())
    _finite(metrics, "train/loss", "val/loss", "val/map_50", "val/map")
    assert metrics["global_step"] == 2
    # test_after_fit: rank 0 alone, on one device, after the process group is gone
    assert json.loads((run / "eval_metrics.json").read_text())["num_images"] == 4
    assert "test_after_fit: " not in (run / "train_ddp_process_1.log").read_text()


@pytest.mark.slow  # ~40 s; test_ddp_cpu_two_processes_one_run_dir covers DDP by default
def test_ddp_cpu_inside_a_sweep(tmp_path: Path) -> None:
    """Each job of a -m sweep starts its own rank-1 process, which joins that job's dir and runs
    that job's overrides (not the whole sweep again)."""
    sweep = tmp_path / "sweep"
    r = run_cli(
        "ssd_lightning.train",
        "-m",
        "anchors=tall_skinny,ssd",
        "trainer=ddp_cpu",
        *tiny(trainer__limit_train_batches=1),
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    for job, anchors in [("0", "tall_skinny"), ("1", "ssd")]:
        child_log = (sweep / job / "train_ddp_process_1.log").read_text()
        assert f"anchors={anchors}" in child_log
        _finite(json.loads((sweep / job / "metrics.json").read_text()), "train/loss", "val/map")
