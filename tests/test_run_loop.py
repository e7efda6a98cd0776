"""The one run loop (trainer.RunLoop) every algorithm runs in: its rows, cadence and end, in process."""

import json

import pytest
from hydra import compose, initialize_config_dir

from smolcluster.paths import CONFIG_DIR
from smolcluster.telemetry.run_files import open_recorder
from smolcluster.train_settings import train_config
from smolcluster.trainer import LossWindow, RunLoop, Trainer

ARGS = ["algo=local", "model.hidden=[16]", "train.batch_size=8", "train.steps=7", "train.log_every=3",
        "train.eval_every=4", "train.checkpoint_every=5"]


@pytest.fixture(scope="module")
def cfg():
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return train_config(compose("config", overrides=ARGS))


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_lead_logs_the_window_mean_with_the_common_fields_on_the_cadence_and_ends_with_a_summary(cfg, tmp_path):
    # the reference: the same trainer's step losses, one by one (the same seed: the same steps)
    ref = Trainer(cfg, [8])
    losses = [float(ref.step_local()[0]) for _ in range(7)]

    trainer = Trainer(cfg, [8])
    saved, save = [], trainer.save  # the steps checkpoints are written at (the final one overwrites the file)
    trainer.save = lambda run_dir, run_state=None: (saved.append(trainer.step), save(run_dir, run_state))[1]
    loop = RunLoop(trainer, open_recorder(cfg, tmp_path), tmp_path, fields=lambda: {"mine": trainer.step})
    loop.start(eval_first=True)
    loop.run(trainer.step_local)
    summary = loop.finish("test", extra_figure=42)

    rows = rows_of(tmp_path)
    logged = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(logged) == [3, 6, 7]  # every log_every steps, and the last
    for step, r in logged.items():
        window = losses[max(0, step - 3):step]
        assert r["loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)
        assert r["samples"] == 8 * step and r["mine"] == step and "lr" in r and "samples_per_s" in r
    evals = [r["step"] for r in rows if "eval_loss" in r]
    assert evals == [0, 4, 7]  # step 0, train.eval_every, the end
    assert summary["algo"] == "test" and summary["steps"] == 7 and summary["samples"] == 56
    assert summary["extra_figure"] == 42
    assert summary["final_loss"] == pytest.approx(sum(losses[-3:]) / 3, rel=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 7
    assert saved == [5, 7]  # train.checkpoint_every, and the end
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 7


def test_a_process_that_is_not_the_lead_logs_only_its_fields_and_takes_no_eval_or_checkpoint(cfg, tmp_path):
    trainer = Trainer(cfg, [8])
    recorder = open_recorder(cfg, tmp_path)
    loop = RunLoop(trainer, recorder, tmp_path, fields=lambda: {"mine": trainer.step}, lead=False)
    loop.start()
    loop.run(trainer.step_local)
    recorder.finish(None)
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == [3, 6, 7] and all(r["mine"] == r["step"] for r in rows)
    assert not {"loss", "lr", "samples", "eval_loss", "trainable_params"} & {k for r in rows for k in r}
    assert trainer.samples == 56  # counted all the same: a lead's successor goes on from it
    assert not (tmp_path / "checkpoint.json").exists()


def test_a_servers_float_losses_are_averaged_in_float64():
    window = LossWindow(3)
    for loss in (2.300342562484741, 0.1, 0.2, 0.3):
        window.add(loss)
    assert window.mean() == pytest.approx(0.2, rel=1e-15)  # float32 would be 0.2 +- 1.5e-8 relative
