"""A hostile machine and hostile users (issue 31): full disks, two runs in one folder, killed exports, changed
data, late checks. Each kind of failure is one line and exit code 2, leaves nothing partial behind, and loses
nothing that was committed. Bounds on metadata and checkpoint configs: test_bounds.py; decode processes and
decode cost: test_cache.py and test_data.py."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from PIL import Image

from patchgen.export.onnx_export import export_onnx
from patchgen.models.checkpoint import load_checkpoint, save_checkpoint
from patchgen.models.config import TrainConfig
from patchgen.models.data import DataSource, load_folder
from patchgen.models.train import new_state, state_dict, train
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.files import atomic_output, check_free_space, claim
from patchgen.runtime.model import load_model
from patchgen.runtime.onnxfile import model_sha256, referenced_bytes

from conftest import blob_folder, blob_images, sample_cli, tiny_config, write_checkpoint

TRAIN = ["--image-size", "16", "--grid", "2", "--base-width", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
         "--attention-resolutions", "4", "--batch-size", "4", "--holdout", "0", "--preview-every", "0"]


def cli(module, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", f"patchgen.cli.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})


def start(module, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", f"patchgen.cli.{module}", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env})


def one_line(r, *fragments):
    """The run failed as the project promises: exit 2, one stderr line with every fragment, no traceback."""
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def wait_for(predicate, timeout=120.0, what="the condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def temporaries(folder):
    return [p.name for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of `size` bytes, unmounted afterwards (skips where mounting is not
    allowed: the injected-error tests below cover the same code)."""
    mounts = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounts.append(folder)
        return folder
    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    export_onnx(write_checkpoint(d / "c.pt", tiny_config()), d / "m.onnx")
    return d / "m.onnx"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return blob_folder(tmp_path_factory.mktemp("images"), 12)


# ---- 1. A write that fails is one line naming the path, exit 2; where the size is known, checked first.

def test_sample_onto_a_disk_that_fills(onnx_model, small_disk):
    disk = small_disk(64 * 1024)
    r = sample_cli("--model", onnx_model, "-n", 40, "--steps", 1, "--out", disk / "out")
    one_line(r, f"cannot write {disk / 'out'}/seed0_", "No space left on device; free some space there")
    written = sorted((disk / "out").glob("*.png"))
    assert 0 < len(written) < 40 and not temporaries(disk)
    for png in written:  # every committed image is whole
        Image.open(png).load()


def test_checkpoint_write_that_fails(tmp_path, small_disk):
    """torch.save wraps the failed write in its own RuntimeError: still one line, and no temporary left."""
    disk = small_disk(256 * 1024)
    config, train_config = tiny_config(base_width=16), TrainConfig()
    state = new_state(config, train_config)
    with pytest.raises(PatchgenError, match=r"^cannot write .*checkpoint\.pt: No space left on device; free some"):
        save_checkpoint(disk / "checkpoint.pt", state_dict(state, config, train_config, DataSource("x")))
    assert not list(disk.iterdir())


@pytest.mark.quick
@pytest.mark.parametrize("errno_, advice", [(errno.ENOSPC, "free some space there"), (errno.EDQUOT, "free some"),
                                            (errno.EROFS, "a writable one"), (errno.EIO, "the disk reports an error")])
def test_a_wrapped_write_failure_is_worded_by_its_kind(tmp_path, errno_, advice):
    with pytest.raises(PatchgenError, match=rf"^cannot write {re.escape(str(tmp_path / 'f.bin'))}: .*; .*{advice}"):
        with atomic_output(tmp_path / "f.bin") as f:
            f.write(b"x")
            try:
                raise OSError(errno_, os.strerror(errno_))
            except OSError as e:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
    assert not list(tmp_path.iterdir())


@pytest.mark.quick
def test_an_unworded_os_error_is_still_one_line():
    from patchgen.cli.common import CliError, user_errors

    @user_errors
    def fails():
        raise OSError(errno.EIO, "Input/output error", "/data/x.png")
    with pytest.raises(CliError, match=r"^Input/output error \(/data/x.png\); the disk reports an error"):
        fails()


def test_export_onto_a_full_disk_is_refused_before_the_work(tmp_path, small_disk):
    disk = small_disk(64 * 1024)
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    t0 = time.perf_counter()
    r = cli("export", ckpt, "-o", disk / "m.onnx", "--quantize", "int8")
    one_line(r, "a int8 export of this model needs", f"but {disk} has", "free; free some space there")
    assert time.perf_counter() - t0 < 60 and not list(disk.iterdir())


def test_training_into_a_full_disk_leaves_no_folder(image_folder, small_disk):
    disk = small_disk(64 * 1024)
    r = cli("train", "--data", image_folder, *TRAIN, "--max-steps", 2, "--out", disk / "run")
    one_line(r, "a checkpoint of this model needs", "choose another --out")
    assert not (disk / "run").exists()


@pytest.mark.quick
def test_free_space_is_said_in_units_that_show_it(tmp_path):
    with pytest.raises(PatchgenError, match=r"the image cache needs 1024\.0G but .* free"):
        check_free_space(tmp_path, 2**40, "the image cache")
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(PatchgenError, match=r"needs \d+\.\dK|needs \d+\.\dM|needs \d+\.\dG"):
        check_free_space(tmp_path, free + 2048, "it")


# ---- 2. A run folder and an export's output are claimed: the second claimant gets the holder's pid.

def _training(image_folder, out, resume):
    # No checkpoint while the second run starts (a loaded machine may start it late): what refuses it is the
    # claim, not the new run's "checkpoint exists" check. SIGTERM then checkpoints the first run.
    run = ["--resume"] if resume else ["--data", image_folder, *TRAIN, "--checkpoint-every", 100000]
    return start("train", *run, "--max-steps", 100000, "--out", out)


def _holding(proc, lock):
    def holds():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        return lock.exists() and lock.read_text().strip() == str(proc.pid)
    return holds


def _log_steps(run):
    log = run / "train_log.csv"
    return [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]] if log.exists() else []


@pytest.mark.parametrize("second", ["new", "resume"])
def test_two_trainings_cannot_share_a_run_folder(tmp_path, image_folder, second):
    run = tmp_path / "run"
    if second == "resume":
        assert cli("train", "--data", image_folder, *TRAIN, "--max-steps", 2, "--out", run).returncode == 0
    first = _training(image_folder, run, second == "resume")
    try:
        wait_for(_holding(first, run / ".patchgen-train.lock"), what="the first run's claim")
        args = ["--resume"] if second == "resume" else ["--data", image_folder, *TRAIN, "--seed", 2]
        r = cli("train", *args, "--max-steps", 100000, "--out", run)
        one_line(r, f"run folder {run} is in use by process {first.pid}; wait for that run to end")
        logged = len(_log_steps(run)) if second == "resume" else 0
        wait_for(lambda: len(_log_steps(run)) > logged, what="the first run's training steps")  # then SIGTERM
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert load_checkpoint(run / "checkpoint.pt")["train_config"].seed == 0  # the first run's, untouched
    assert not (run / ".patchgen-train.lock").exists()
    steps = _log_steps(run)
    assert steps == sorted(set(steps))  # every step logged once


HOLDER = """
import sys, time
from pathlib import Path
from patchgen.runtime.files import claim
with claim(Path(sys.argv[1]), "x", "wait"):
    print("held", flush=True)
    time.sleep(600)
"""


def holding(lock):
    """A real process that holds the claim `lock` until killed (claim is what export and train use)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_two_exports_to_one_output(tmp_path):
    """A second export to an -o that another one is writing is refused with the first one's pid; the first
    is a process holding the claim (a real export may finish first on a loaded machine)."""
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    out = tmp_path / "m.onnx"
    first = holding(tmp_path / ".m.onnx.lock")
    try:
        one_line(cli("export", ckpt, "-o", out), f"{out} is in use by process {first.pid}; another export is "
                                                 "writing it")
    finally:
        first.kill()
        first.wait()
    assert not out.exists()
    r = cli("export", ckpt, "-o", out)  # the kernel released the killed holder's claim
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "m.onnx"]  # the lock went with the export


def test_a_claim_left_by_a_killed_process_is_taken_over(tmp_path):
    lock = tmp_path / ".x.lock"
    holder = holding(lock)
    with pytest.raises(PatchgenError, match=f"^x is in use by process {holder.pid}; wait$"):
        with claim(lock, "x", "wait"):
            pass
    holder.kill()
    holder.wait()
    with claim(lock, "x", "wait"):  # the kernel released the dead holder's flock
        with claim(lock, "x", "wait"):  # re-entrant in one process
            assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


# onnxruntime's telemetry writes this small fixed file into $TMPDIR on import, in every process that imports
# it (patchgen-sample too); it is overwritten, never accumulates, and is not an export's temporary.
ONNXRUNTIME_SESSION_FILE = ".ses"


# ---- 5. int8's temporaries live in the output folder: a kill leaves none in $TMPDIR; the next export sweeps.

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_int8_export_leaves_nothing_in_tmpdir(tmp_path, sig):
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config(), data=DataSource("emoji-faces"))
    tmpdir, out = tmp_path / "tmpdir", tmp_path / "out"
    tmpdir.mkdir(), out.mkdir()
    proc = start("export", ckpt, "-o", out / "m.onnx", "--quantize", "int8", "--calibration-data", "emoji-faces",
                 env={"TMPDIR": str(tmpdir)})
    # onnxruntime's own calibration folder inside int8's scratch folder: deep in the quantization
    wait_for(lambda: proc.poll() is None and any("ort.quant" in p.name for p in out.rglob("*")), timeout=240,
             what="onnxruntime's temporaries")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert [p.name for p in tmpdir.iterdir() if p.name != ONNXRUNTIME_SESSION_FILE] == []
    if sig == signal.SIGTERM:  # unwound: nothing left at all, one line
        assert proc.returncode == 128 + sig and err.strip().splitlines()[-1] == "Terminated.", err[-2000:]
        assert not list(out.iterdir())
    else:
        assert temporaries(out)  # a kill -9 cannot clean up: the next export to that name does
        r = cli("export", ckpt, "-o", out / "m.onnx", "--skip-check", env={"TMPDIR": str(tmpdir)})
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]


# ---- 8. A resume proves it has the run's data.

def test_resume_refuses_a_changed_image_folder(tmp_path, image_folder):
    folder = tmp_path / "images"
    folder.mkdir()
    for png in sorted(image_folder.iterdir()):
        (folder / png.name).write_bytes(png.read_bytes())
    run = tmp_path / "run"
    assert cli("train", "--data", folder, *TRAIN, "--max-steps", 2, "--out", run).returncode == 0
    for i, img in enumerate(blob_images(6, 16, seed=9)):
        Image.fromarray(img).save(folder / f"new{i}.png")
    for png in sorted(folder.glob("00*.png"))[:2]:
        png.unlink()
    before = (run / "checkpoint.pt").read_bytes()
    r = cli("train", "--resume", "--max-steps", 4, "--out", run)
    one_line(r, "changed since this run started: it had 12 usable image(s), now 16",
             "pass --accept-changed-data")
    assert (run / "checkpoint.pt").read_bytes() == before
    r = cli("train", "--resume", "--accept-changed-data", "--max-steps", 4, "--out", run)
    assert r.returncode == 0, r.stderr
    data = load_checkpoint(run / "checkpoint.pt")["data"]
    assert data.num_images == 16 and data.num_train == 16 and data.identity == load_folder(folder, 16).source.identity


def test_resume_through_the_api_checks_the_data(tmp_path, image_folder, tiny_train_config):
    data = load_folder(image_folder, 16)
    train(tmp_path, 1, data=data, config=tiny_config(), train_config=tiny_train_config, preview_every=0)
    other = load_folder(image_folder, 16)
    changed = type(data)(other.images[:6], DataSource(data.source.name, num_images=6, identity="0" * 16))
    with pytest.raises(PatchgenError, match="had 12 usable image"):
        train(tmp_path, 2, data=changed, resume=True)
    assert train(tmp_path, 2, data=changed, resume=True, accept_changed_data=True).step == 2


# ---- 9. Everything knowable before the first write is checked before it.

def test_a_run_folder_that_cannot_be_written_fails_before_the_data_loads(tmp_path, image_folder):
    r = cli("train", "--data", image_folder, *TRAIN, "--max-steps", 2, "--out", "/proc/run")
    one_line(r, "cannot create folder /proc/run")
    assert "loading" not in r.stderr


def test_no_image_left_to_train_on(tmp_path, image_folder):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(next(image_folder.iterdir()).read_bytes())
    i = TRAIN.index("--holdout")
    r = cli("train", "--data", one, *TRAIN[:i], *TRAIN[i + 2:], "--holdout", "0.9", "--max-steps", 2, "--out", tmp_path / "run")
    one_line(r, "holding out 0.9 of 1 image(s) leaves none to train on; lower --holdout")
    assert not (tmp_path / "run").exists()


# ---- 10. Smaller kinds of the same spirit.

def test_a_budget_below_the_warm_up_is_refused_before_it(onnx_model, monkeypatch):
    import patchgen.runtime.generate as generate

    model = load_model(onnx_model)
    warmed = []
    real_probe = generate.probe

    def probe(model, request):
        warm_up, run = real_probe(model, request)
        return (lambda: warmed.append(1) or warm_up()), run
    monkeypatch.setattr(generate, "probe", probe)
    monkeypatch.setattr(generate, "IMAGE_ARRAYS", 2**16)  # an image whose buffers alone overrun the budget
    from patchgen.runtime.memory import current_rss
    budget = current_rss() + 64 * 2**20
    with pytest.raises(PatchgenError, match=r"below this model's minimum of .*one patch per call"):
        generate.make_plan(model, 1, memory_budget=budget)
    assert not warmed


def test_weights_beyond_the_memory_available_are_refused_before_opening(onnx_model, monkeypatch):
    import patchgen.runtime.model as model_module

    monkeypatch.setattr(model_module, "available_memory", lambda rss: (rss + 1000, "MemAvailable"))
    monkeypatch.setattr(model_module, "open_model_session", lambda *a: pytest.fail("opened"))
    with pytest.raises(PatchgenError, match=r"needs at least .* of weights.*can have only .*MemAvailable"):
        load_model(onnx_model)


def test_a_grid_image_that_cannot_fit_is_refused_before_any_image(onnx_model, tmp_path):
    t0 = time.perf_counter()
    r = sample_cli("--model", onnx_model, "-n", 10**7, "--steps", 1, "--out", tmp_path / "out",
                   "--grid-image", tmp_path / "grid.png")
    one_line(r, "the grid image", "leave out --grid-image")
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "out").exists()


def test_an_output_never_replaces_an_input(tmp_path, onnx_model):
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    before = ckpt.read_bytes()
    one_line(cli("export", ckpt, "-o", ckpt, "--force"), "is the checkpoint being exported; choose another -o")
    assert ckpt.read_bytes() == before
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_model.read_bytes())
    r = sample_cli("--model", model, "--steps", 1, "--out", tmp_path / "out", "--grid-image", model)
    one_line(r, "is the model file")
    assert model.read_bytes() == onnx_model.read_bytes() and not (tmp_path / "out").exists()


def test_a_data_path_that_is_not_utf8_exports(tmp_path):
    name = "folder:" + os.fsdecode(b"/data/caf\xe9")
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config(), data=DataSource(name, num_train=1))
    export_onnx(ckpt, tmp_path / "m.onnx", check=False)
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert meta["patchgen.data.name"] == "folder:/data/caf\\xe9"
    r = sample_cli("--model", tmp_path / "m.onnx", "-n", 1, "--steps", 1, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr


def test_an_unused_sparse_tail_of_external_data_costs_nothing(tmp_path, onnx_model):
    onnx.save(onnx.load(onnx_model), tmp_path / "ext.onnx", save_as_external_data=True, location="w.bin",
              size_threshold=1024)
    sha, size = model_sha256(tmp_path / "ext.onnx"), referenced_bytes(tmp_path / "ext.onnx")
    with open(tmp_path / "w.bin", "r+b") as f:
        f.truncate(8 * 2**30)  # a sparse 8 GiB tail that no tensor names
    t0 = time.perf_counter()
    assert model_sha256(tmp_path / "ext.onnx") == sha and referenced_bytes(tmp_path / "ext.onnx") == size
    model = load_model(tmp_path / "ext.onnx")
    assert time.perf_counter() - t0 < 10 and model.weights_bytes == size


def test_a_peer_rank_that_fails_leaves_one_clean_line_per_rank(tmp_path):
    args = ["--data", tmp_path / "missing", *TRAIN, "--max-steps", 2, "--out", tmp_path / "run"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "patchgen.cli.train", *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "[rank1]: Traceback" not in r.stderr and "[rank0]: Traceback" not in r.stderr, r.stderr[-4000:]
    assert "does not exist" in r.stderr and not (tmp_path / "run").exists()


def test_ctrl_c_inside_torchs_exporter_waits_for_it():
    """torch's exporter turns a KeyboardInterrupt raised inside it into its own page-long failure report; Ctrl-C
    and SIGTERM there are held until it returns, then act as usual (one "Aborted."/"Terminated." line)."""
    from patchgen.export.onnx_export import _signals_held

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is delivered here, and held
            reached.append("end of the block")
    assert reached == ["end of the block"]


# ---- Found by a hostile pass over the first version of these fixes.

@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(data=5), "data: must be a table"),
    (lambda c: c["data"].update(name=5), "data name must be a str"),
    (lambda c: c.update(data=None), "names no data set"),
    (lambda c: c["ema"].update({k: v * float("nan") for k, v in c["ema"].items() if v.is_floating_point()}),
     "ema holds NaN or infinite weights"),
])
def test_a_damaged_checkpoint_is_one_line_for_export_and_resume(tmp_path, image_folder, edit, message):
    run = tmp_path / "run"
    assert cli("train", "--data", image_folder, *TRAIN, "--max-steps", 1, "--out", run).returncode == 0
    ckpt = __import__("torch").load(run / "checkpoint.pt", weights_only=True)
    edit(ckpt)
    __import__("torch").save(ckpt, run / "checkpoint.pt")
    r = cli("train", "--resume", "--max-steps", 2, "--out", run)
    one_line(r, message)
    if "names no data set" not in message:  # export needs no data set
        one_line(cli("export", run / "checkpoint.pt", "-o", tmp_path / "m.onnx"), message)
        assert not (tmp_path / "m.onnx").exists()


def test_an_output_folder_that_is_not_utf8_is_refused_before_the_work(tmp_path):
    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"))
    folder.mkdir()
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    one_line(cli("export", ckpt, "-o", folder / "m.onnx"), "the path is not valid UTF-8")
    assert not list(folder.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_staged_file_is_written_leaves_nothing(tmp_path, sig):
    """Ctrl-C or SIGTERM at the moment the export writes its temporary .onnx: it is removed on the way out."""
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(3):
        proc = start("export", ckpt, "-o", out / "m.onnx", "--force")
        wait_for(lambda: proc.poll() is not None or any(p.name.endswith(".tmp") for p in out.iterdir()),
                 timeout=240, what="the staged file")
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        assert temporaries(out) == [] and not (out / ".m.onnx.lock").exists()


def test_a_grid_image_that_is_one_of_the_samples_is_refused(onnx_model, tmp_path):
    (tmp_path / "out").mkdir()
    r = sample_cli("--model", onnx_model, "-n", 2, "--steps", 1, "--out", tmp_path / "out", "--grid-image",
                   tmp_path / "out" / ".." / "out" / "seed0_00001.png")
    one_line(r, "is one of this run's own PNGs")
    assert not list((tmp_path / "out").iterdir())


def test_a_model_that_predicts_nan_is_one_line(tmp_path):
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    export_onnx(ckpt, tmp_path / "m.onnx", check=False)
    model = onnx.load(tmp_path / "m.onnx")
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 4:  # the convolutions' weights
            init.raw_data = b"\xff\xff\xff\x7f" * (len(init.raw_data) // 4)  # NaN
    onnx.save(model, tmp_path / "nan.onnx")
    r = sample_cli("--model", tmp_path / "nan.onnx", "-n", 1, "--steps", 2, "--out", tmp_path / "out")
    one_line(r, "predicts NaN or infinite noise", "re-export it")
    assert not (tmp_path / "out").exists()


# ---- The first hour: no silent overwrite, an interruption that says what it left, progress off a terminal.

def test_sampling_again_into_the_same_names_is_refused_without_force(onnx_model, tmp_path):
    args = ("--model", onnx_model, "-n", 2, "--steps", 1, "--out", tmp_path / "out")
    assert sample_cli(*args).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    r = sample_cli(*args)
    one_line(r, "seed0_00000.png and 1 more exist", "--force")
    assert len(r.stderr.strip().splitlines()) == 1  # refused before the model was opened (no notes, no header)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    # another seed, or fewer images than an earlier run's, or a grid image alone: each what it would replace
    assert sample_cli(*args[:-2], "--seed", 1, "--out", tmp_path / "out").returncode == 0
    one_line(sample_cli("--model", onnx_model, "-n", 1, "--steps", 1, "--out", tmp_path / "out"),
             "seed0_00000.png already exists")
    (tmp_path / "grid.png").write_bytes(b"mine")
    one_line(sample_cli("--model", onnx_model, "-n", 1, "--steps", 1, "--out", tmp_path / "other", "--grid-image",
                        tmp_path / "grid.png"), "grid.png already exists")
    assert not (tmp_path / "other").exists() and (tmp_path / "grid.png").read_bytes() == b"mine"
    r = sample_cli(*args, "--force")
    assert r.returncode == 0, r.stderr
    assert all(p.stat().st_mtime_ns > before[p.name] for p in (tmp_path / "out").iterdir() if p.name in before)
    # the advice names the option that gives the taken name
    one_line(sample_cli("--model", onnx_model, "-n", 1, "--steps", 1, "--out", tmp_path / "third", "--grid-image",
                        tmp_path / "grid.png"), "choose another --grid-image")


def test_force_never_replaces_an_input_nor_a_folder(onnx_model, tmp_path):
    """--force replaces an earlier run's files, never an input: not through a link to it either; a folder where
    an image goes is refused before any work; a --grid-image inside a new --out is fine."""
    out = tmp_path / "out"
    assert sample_cli("--model", onnx_model, "-n", 1, "--steps", 1, "--out", out).returncode == 0
    link = tmp_path / "link.png"
    link.symlink_to(out / "seed0_00000.png")
    before = (out / "seed0_00000.png").read_bytes()
    one_line(sample_cli("--model", onnx_model, "-n", 1, "--steps", 1, "--out", out, "--init-img", link, "--force"),
             "is one of the PNGs this run writes")
    assert (out / "seed0_00000.png").read_bytes() == before
    (tmp_path / "taken" / "seed0_00001.png").mkdir(parents=True)
    r = sample_cli("--model", onnx_model, "-n", 2, "--steps", 1, "--out", tmp_path / "taken", "--force")
    one_line(r, "seed0_00001.png is a folder", "choose another --out or --seed")
    assert "sampling" not in r.stderr.replace(str(tmp_path), "")
    r = sample_cli("--model", onnx_model, "-n", 1, "--steps", 1, "--out", tmp_path / "new",
                   "--grid-image", tmp_path / "new" / "grid.png")
    assert r.returncode == 0 and (tmp_path / "new" / "grid.png").exists(), r.stderr
    one_line(sample_cli("--model", onnx_model, "-n", 1, "--steps", 1, "--out", tmp_path / "o2", "--grid-image",
                        tmp_path / "nowhere" / "grid.png"), "--grid-image", "its folder", "does not exist")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_while_sampling_says_what_was_written(onnx_model, tmp_path, sig):
    """Ctrl-C or SIGTERM of a real sampler: the images written so far are whole and named, exit 128 + signal,
    no temporary left; stopped before its first image, no folder it created is left either."""
    out = tmp_path / "out"
    proc = start("sample", "--model", onnx_model, "-n", 5000, "--steps", 50, "--memory-budget", "min",
                 "--threads", 1, "--out", out)
    wait_for(lambda: proc.poll() is not None or (out / "seed0_00001.png").exists(), timeout=240,
             what="the second image")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    found = re.search(r"stopped: (\d+) of 5000 image\(s\) written to (\S+) \(seed0_00000.png to (seed0_\d+.png)\)",
                      err)
    assert found and "Traceback" not in err, err[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == int(found.group(1)) and names[-1] == found.group(3) and found.group(2) == str(out)
    assert err.strip().splitlines()[-1] == ("Aborted." if sig == signal.SIGINT else "Terminated.")
    assert err.strip().splitlines()[-2].startswith("stopped: ")  # no blank line, no second message

    # before the first image: nothing on disk, and the folder this run made is gone
    empty = tmp_path / "new" / "folder"
    proc = start("sample", "--model", onnx_model, "-n", 1, "--steps", 1000, "--sampler", "ddpm",
                 "--memory-budget", "min", "--threads", 1, "--out", empty)
    header = ""
    while "on cpu:" not in header and proc.poll() is None:  # the line printed as sampling starts
        header = proc.stderr.readline()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "stopped before the first of 1 image(s) was written" in err, err
    assert not (tmp_path / "new").exists()


def test_progress_lines_when_stderr_is_a_file(onnx_model, tmp_path, image_folder):
    """Off a terminal (nohup, CI) the sampler and the trainer print a line per tenth of the work, with an ETA."""
    with open(tmp_path / "sample.log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "patchgen.cli.sample", "--model", onnx_model, "-n", "2", "--steps",
                            "20", "--memory-budget", "min", "--out", tmp_path / "out"], stderr=log, timeout=300)
    text = (tmp_path / "sample.log").read_text()
    assert r.returncode == 0, text
    lines = [line for line in text.splitlines() if line.startswith("sampling (2 runs of 20 steps): ")]
    assert len(lines) == 10 and lines[-1].startswith("sampling (2 runs of 20 steps): 40/40 steps (100%)"), text
    assert "ETA" in lines[0] and "\r" not in text
    with open(tmp_path / "train.log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "patchgen.cli.train", "--data", image_folder, *TRAIN,
                            "--max-steps", "10", "--out", tmp_path / "run"], stderr=log, timeout=300)
    text = (tmp_path / "train.log").read_text()
    assert r.returncode == 0, text
    lines = [line for line in text.splitlines() if line.startswith("training: ")]
    assert len(lines) == 10 and lines[-1].startswith("training: 10/10 steps (100%)") and "loss" in lines[-1], text


@pytest.mark.quick
def test_line_progress_every_tenth_or_every_30_s():
    """LineProgress on a fake clock: a line at each tenth of the work, and one after 30 s without one; the
    ETA from the pace since the start (a resumed job's pace from where it resumed)."""
    import io

    from patchgen.cli.common import LineProgress

    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(1000, "training", "steps", out, clock=lambda: now[0], start=500)
    for _ in range(10):  # 10 s a step: a line every 30 s (3 steps), none of them at a tenth
        now[0] += 10
        bar.update(1, "loss 0.1")
    lines = out.getvalue().splitlines()
    assert lines == ["training: 503/1000 steps (50%), 30 s, ETA 1 h 22 min; loss 0.1",
                     "training: 506/1000 steps (51%), 1 min 0 s, ETA 1 h 22 min; loss 0.1",
                     "training: 509/1000 steps (51%), 1 min 30 s, ETA 1 h 21 min; loss 0.1"]
    bar.update(90)  # reaches 60%: a line at once
    assert out.getvalue().splitlines()[-1].startswith("training: 600/1000 steps (60%)")
