"""Training: the loss falls, checkpoints round-trip, resume equals an uninterrupted run, bad files fail clearly."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.config import TrainConfig
from patchgen.models.data import holdout_split, load_data, load_emoji, load_folder, load_named, prepare_image
from patchgen.models.train import train
from patchgen.runtime.errors import PatchgenError

from conftest import tiny_config

NO_PREVIEW = dict(preview_every=0, checkpoint_every=1000)


@pytest.mark.parametrize("bf16", [False, True])
def test_loss_falls(tmp_path, blobs16, tiny_train_config, bf16):
    result = train(tmp_path, 60, data=blobs16, config=tiny_config(), tc=tiny_train_config, bf16=bf16, **NO_PREVIEW)
    losses = np.array(result.losses)
    assert len(losses) == 60
    assert losses[-15:].mean() < 0.7 * losses[:5].mean()
    if bf16:  # mixed precision: same first batch, nearly the same loss; weights stay float32
        fp32 = train(tmp_path / "fp32", 1, data=blobs16, config=tiny_config(), tc=tiny_train_config, **NO_PREVIEW)
        assert losses[0] == pytest.approx(fp32.losses[0], rel=0.02)
        ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
        assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("overrides,tc", [
    (dict(prediction="v", global_context=2), dict(loss="l2", loss_weighting="min_snr")),
    (dict(prediction="x0", gcc_source="x0"), dict(patches_per_image=2)),
    (dict(grid=1, use_position=False, use_gcc=False), {}),
])
def test_levers_train(tmp_path, blobs16, overrides, tc):
    result = train(tmp_path, 3, data=blobs16, config=tiny_config(**overrides),
                   tc=TrainConfig(batch_size=4, **tc), **NO_PREVIEW)
    assert all(np.isfinite(result.losses))


def test_checkpoint_round_trip(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 5, data=blobs16, config=tiny_config(), tc=tiny_train_config, **NO_PREVIEW)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 5 and ckpt["model_config"] == tiny_config()
    assert ckpt["data"]["name"] == "blobs" and ckpt["data"]["num_train"] == 58  # 10% of 64 held out
    net = model_from_checkpoint(ckpt, ema=False)
    again = model_from_checkpoint(load_checkpoint(tmp_path / "checkpoint.pt"), ema=False)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 999])
    pos, gcc = torch.eye(4)[:2], torch.randn(2, 3, 8, 8)
    assert torch.equal(net(x, t, pos, gcc), again(x, t, pos, gcc))


def test_resume_equals_uninterrupted(tmp_path, blobs16):
    config = tiny_config(dropout=0.1, gcc_source="x0")  # dropout and the self-conditioning coin use RNG too
    tc = TrainConfig(batch_size=4, warmup_steps=3, patches_per_image=3)
    whole = train(tmp_path / "a", 8, data=blobs16, config=config, tc=tc, **NO_PREVIEW)
    first = train(tmp_path / "b", 4, data=blobs16, config=config, tc=tc, **NO_PREVIEW)
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG
    second = train(tmp_path / "b", 8, resume=True, data=blobs16, **NO_PREVIEW)
    assert first.losses + second.losses == whole.losses
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_preview_is_written(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 2, data=blobs16, config=tiny_config(), tc=tiny_train_config, preview_every=2,
          preview_count=4, preview_steps=3)
    img = Image.open(tmp_path / "preview_0000002.png")
    assert img.size == (2 * 18 + 2, 2 * 18 + 2)


def test_new_run_refuses_existing_checkpoint(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 1, data=blobs16, config=tiny_config(), tc=tiny_train_config, **NO_PREVIEW)
    with pytest.raises(PatchgenError, match="--resume"):
        train(tmp_path, 1, data=blobs16, config=tiny_config(), tc=tiny_train_config, **NO_PREVIEW)


def test_corrupt_checkpoints_fail_clearly(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 1, data=blobs16, config=tiny_config(), tc=tiny_train_config, **NO_PREVIEW)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(PatchgenError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(PatchgenError, match="not a patchgen checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(PatchgenError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_folder_data_skips_unreadable(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGBA", (30, 30), (0, 0, 255, 0)).save(tmp_path / "sub" / "b.webp")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_folder(tmp_path, 8)
    assert data.images.shape == (2, 8, 8, 3) and data.source["skipped"] == 1
    assert (data.images[1] == 255).all()  # transparent pixels composite onto white
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchgenError, match="no readable images"):
        load_folder(tmp_path / "empty", 8)


def test_prepare_image_centre_crops():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))  # the centre square is white
    assert (prepare_image(img, 4) == 255).all()


def test_holdout_split_is_fixed_and_disjoint():
    train_a, held_a = holdout_split(100, 0.1, 0)
    train_b, held_b = holdout_split(100, 0.1, 0)
    assert np.array_equal(held_a, held_b) and len(held_a) == 10
    assert not set(train_a) & set(held_a) and len(train_a) + len(held_a) == 100


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "patchgen.cli.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--image-size", "30", "--grid", "4"], "does not divide"),
    (["--grid", "0"], "--grid"),
])
def test_cli_bad_input(tmp_path, args, message):
    r = run_cli(*args, "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) > 0


def test_cli_resume_non_patchgen_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "checkpoint.pt")
    r = run_cli("--out", str(tmp_path), "--resume")
    assert r.returncode == 2 and "not a patchgen checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_emoji_data_ships_with_attribution():
    data = load_emoji(8, skin_tones=False)
    assert 1500 < len(data.images) < 4009 and data.images.dtype == np.uint8
    assert "CC-BY 4.0" in data.source["attribution"] and data.source["skipped"] == 0


def test_emoji_faces_subset_round_trips_through_its_name():
    faces = load_data("emoji-faces", 8)
    assert len(faces.images) == 125 and faces.source["name"] == "twemoji-faces"
    assert "CC-BY 4.0" in faces.source["attribution"]
    np.testing.assert_array_equal(load_named("twemoji-faces", 8).images, faces.images)
    assert load_named("twemoji-no-skin-tones", 8).source == load_emoji(8, skin_tones=False).source


def test_a_folder_named_like_a_subset_is_a_folder(tmp_path, monkeypatch):
    (tmp_path / "faces").mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "faces" / "a.png")
    monkeypatch.chdir(tmp_path)
    data = load_data("faces", 4)
    assert len(data.images) == 1 and data.source["name"].startswith("folder:")


@pytest.mark.parametrize("name", ["twemoji-flags", "imagenet"])
def test_unknown_data_name_is_a_clear_error(name):
    with pytest.raises(PatchgenError, match="unknown data set"):
        load_named(name, 8)


def test_sigterm_checkpoints_then_resumes(tmp_path, blobs16):
    for k, img in enumerate(blobs16.images[:16]):
        Image.fromarray(img).save(tmp_path / f"{k}.png")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "patchgen.cli.train", "--data", str(tmp_path), "--image-size", "16",
            "--base-width", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "4",
            "--batch-size", "2", "--max-steps", "100000", "--preview-every", "0", "--out", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "Traceback" not in err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert step >= 3
    assert not list(run.glob("*.tmp"))
    r = run_cli("--out", str(run), "--resume", "--max-steps", str(step + 2), "--preview-every", "0")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run / "checkpoint.pt")["step"] == step + 2


def test_seam_score_and_border_step():
    from patchgen.models.metrics import border_step, seam_score

    yy, xx = np.mgrid[:16, :16]
    smooth = np.repeat(((xx + yy) * 8).astype(np.uint8)[None, :, :, None], 3, axis=3)
    assert seam_score(smooth, 2) == pytest.approx(1.0)
    quilt = smooth.copy()
    quilt[:, :8, 8:] = 255 - quilt[:, :8, 8:]  # one quadrant from another picture
    assert seam_score(quilt, 2) > 3
    assert border_step(smooth, 2) == pytest.approx(8.0)  # each neighbour pair differs by 8
    assert border_step(quilt, 2) > 3 * 8


def test_evaluation_log(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 2, data=blobs16, config=tiny_config(), tc=tiny_train_config, preview_every=2,
          preview_count=4, preview_steps=2)
    rows = (tmp_path / "eval_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,seam,seam_real,swap_increase_0_300") and rows[1].startswith("2,")
