"""`patchgen-sample --report` and `patchgen-export --report`: the commands' machine-readable records
(cli/report.py), and the benchmarks that read them instead of what the commands print, which is worded for people."""
import ast
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from patchgen.cli import export as export_command
from patchgen.cli.report import SCHEMA, write_report
from patchgen.cli.sample import main
from patchgen.export.onnx_export import export_onnx
from patchgen.runtime.metadata import patchgen_version
from patchgen.runtime.onnxfile import model_sha256

from conftest import sample_cli, tiny_config, write_checkpoint

BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    export_onnx(write_checkpoint(d / "c.pt", tiny_config()), d / "m.onnx")
    return d / "m.onnx"


def invoke(*args):
    """patchgen-sample in this process: (exit code, stderr)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr


def refused(r, *fragments):
    """Exit 2 and one `Error:` line holding every fragment."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(f in r.stderr for f in fragments), r.stderr


def load_benchmark(name: str, monkeypatch):
    """benchmarks/<name>.py as a module (it imports benchlib from its own folder)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_of_a_finished_run(onnx_model, tmp_path, monkeypatch):
    out, report = tmp_path / "out", tmp_path / "run.json"
    code, err = invoke("--model", onnx_model, "-n", 2, "--steps", 2, "--threads", 1, "--out", out,
                       "--grid-image", tmp_path / "grid.png", "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["schema"] == SCHEMA == 1 and r["status"] == "done" and r["error"] is None
    assert r["command"] == "patchgen-sample" and r["version"] == patchgen_version() != "unknown"
    assert r["model"]["path"] == str(onnx_model) and r["model"]["name"] == "m"
    assert r["model"]["sha256"] == model_sha256(onnx_model)
    assert (r["model"]["grid"], r["model"]["image_size"], r["model"]["channels"]) == (2, 16, 3)
    assert r["request"] == {"num_images": 2, "seed": 0, "sampler": "dpm++", "steps": 2, "steps_run": 2, "eta": None,
                            "edit": None}
    plan = r["plan"]
    assert plan["patch_batch"] >= 1 and plan["allocation"] in ("lean", "arena") and plan["threads"] == 1
    assert plan["default_budget"] and plan["budget_bytes"] > plan["predicted_peak_bytes"] > 2**20
    assert r["peak_rss_bytes"] > 2**20  # the kernel's high-water mark, in bytes (this test process's)
    s = r["seconds"]
    assert s["total"] >= s["sampling"] > 0 and s["per_image"] == pytest.approx(s["sampling"] / 2)
    assert r["files"] == [str(out / "seed0_00000.png"), str(out / "seed0_00001.png"), str(tmp_path / "grid.png")]
    assert all(Path(f).is_file() for f in r["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "out", "run.json"]  # no temporary left
    arm64 = load_benchmark("arm64_compare", monkeypatch).cli_report(report)  # what the arm64 comparison reads
    assert arm64 == {"s_per_image": s["per_image"], "peak_mib": r["peak_rss_bytes"] / 2**20}


def test_report_of_a_refused_budget_names_the_minimum(onnx_model, tmp_path):
    """A budget below the weights is refused while loading (a bound); at that bound, the planner refuses with
    the measured minimum, which a fresh run accepts. The report says which, and what the run had by then."""
    report = tmp_path / "r.json"
    args = ("--model", onnx_model, "-n", 1, "--steps", 1, "--threads", 1, "--out", tmp_path / "out", "--report",
            report, "--force")
    r = sample_cli(*args, "--memory-budget", "1M")
    refused(r, "memory budget 1.0M is below")
    bound = json.loads(report.read_text())
    assert bound["status"] == "error" and bound["plan"] is None and bound["model"]["sha256"] is None
    assert bound["error"]["stage"] == "loading" and bound["error"]["minimum_budget_bytes"] > 2**20
    assert bound["error"]["message"] in r.stderr and not (tmp_path / "out").exists()
    r = sample_cli(*args, "--memory-budget", str(bound["error"]["minimum_budget_bytes"]))
    refused(r)
    measured = json.loads(report.read_text())
    assert measured["error"]["stage"] == "planning" and measured["model"]["sha256"] == model_sha256(onnx_model)
    assert measured["error"]["minimum_budget_bytes"] > bound["error"]["minimum_budget_bytes"]
    r = sample_cli(*args, "--memory-budget", str(measured["error"]["minimum_budget_bytes"]))
    assert r.returncode == 0, r.stderr
    done = json.loads(report.read_text())
    assert done["status"] == "done" and done["plan"]["budget_bytes"] == measured["error"]["minimum_budget_bytes"]


def test_a_report_path_that_cannot_be_written_is_refused_before_any_work(onnx_model, tmp_path):
    (tmp_path / "folder.json").mkdir()
    base = ("--model", onnx_model, "-n", 1, "--steps", 1, "--out", tmp_path / "out")
    refused(sample_cli(*base, "--report", tmp_path / "folder.json"), "--report", "is a directory")
    refused(sample_cli(*base, "--report", tmp_path / "nowhere" / "r.json"), "--report", "does not exist")
    refused(sample_cli(*base, "--report", onnx_model), "is the model file")
    refused(sample_cli(*base, "--report", tmp_path / "g.png", "--grid-image", tmp_path / "g.png"),
            "--report", "is the --grid-image too")
    refused(sample_cli(*base, "--report", tmp_path / "out" / "seed0_00000.png"), "one of this run's own PNGs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json"]  # nothing made, no out


def test_an_earlier_report_is_replaced_only_with_force(onnx_model, tmp_path):
    report = tmp_path / "r.json"
    report.write_text("mine")
    base = ("--model", onnx_model, "-n", 1, "--steps", 1, "--report", report)
    refused(sample_cli(*base, "--out", tmp_path / "a"), "r.json already exists", "--force",
            "choose another --report")
    assert report.read_text() == "mine" and not (tmp_path / "a").exists()
    r = sample_cli(*base, "--out", tmp_path / "a", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads(report.read_text())["status"] == "done"


def test_report_in_the_out_folder(onnx_model, tmp_path):
    """--report inside an --out the run creates: written there, done or refused."""
    out = tmp_path / "new"
    code, err = invoke("--model", onnx_model, "-n", 1, "--steps", 1, "--out", out, "--report", out / "r.json")
    assert code == 0, err
    assert json.loads((out / "r.json").read_text())["files"] == [str(out / "seed0_00000.png")]
    out = tmp_path / "refused"
    code, err = invoke("--model", onnx_model, "-n", 1, "--steps", 1, "--out", out, "--report", out / "r.json",
                       "--memory-budget", "1M")
    assert code == 2 and [p.name for p in out.iterdir()] == ["r.json"], err
    assert json.loads((out / "r.json").read_text())["status"] == "error"


def test_report_of_a_stopped_run(onnx_model, tmp_path, monkeypatch):
    """Ctrl-C after the first image: status stopped, the image that was written, and the grid that was not."""
    import patchgen.runtime.images as images

    real, seen = images.save_png, []

    def save_png(path, image, text=None):
        if seen:
            raise KeyboardInterrupt
        seen.append(path)
        real(path, image, text)

    monkeypatch.setattr(images, "save_png", save_png)
    report = tmp_path / "r.json"
    code, err = invoke("--model", onnx_model, "-n", 3, "--steps", 1, "--memory-budget", "min", "--out",
                       tmp_path / "out", "--grid-image", tmp_path / "g.png", "--report", report)
    assert code == 130 and "stopped: 1 of 3 image(s) written" in err, err
    r = json.loads(report.read_text())
    assert r["status"] == "stopped" and r["error"] is None and r["files"] == [str(tmp_path / "out" / "seed0_00000.png")]
    assert r["seconds"]["sampling"] is None and r["plan"]["patch_batch"] == 1


def test_write_report_is_atomic(tmp_path):
    """A report that fails while it is written leaves the earlier file whole and no temporary beside it."""
    path = tmp_path / "r.json"
    write_report(path, {"schema": 1, "status": "done"})
    before = path.read_text()
    with pytest.raises(TypeError):
        write_report(path, {"schema": 1, "status": object()})  # not JSON: fails inside the write
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---- patchgen-export --report

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("checkpoint") / "c.pt", tiny_config())


def export(*args):
    """patchgen-export in this process: (exit code, stdout, stderr)."""
    r = CliRunner().invoke(export_command.main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_export_report_of_a_finished_export(checkpoint, tmp_path):
    """Each file written with its size and hash, the parity error the command printed and its limit."""
    model, report = tmp_path / "m.onnx", tmp_path / "export.json"
    code, out, err = export(checkpoint, "-o", model, "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert (r["schema"], r["command"], r["version"], r["status"]) == (1, "patchgen-export", patchgen_version(), "done")
    assert r["checkpoint"] == str(checkpoint) and r["error"] is None and r["parameters"] > 1000
    assert r["request"] == {"precision": "fp32", "int8_activations": None, "weights": "ema", "simplify": True,
                            "calibration_data": None}
    parity = r["parity"]
    assert parity["checked"] and parity["prediction"] == "eps" and parity["rms_error"] is None
    assert 0 <= parity["max_error"] <= parity["max_error_tolerance"] == 1e-4
    assert f"= {parity['max_error']:.2e} (limit 0.0001)" in out  # the line printed for people says the same
    assert r["files"] == [{"path": str(model), "bytes": model.stat().st_size,
                           "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}]
    assert r["model_sha256"] == model_sha256(model) and r["seconds"]["total"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "m.onnx"]  # no temporary left


def test_export_report_of_a_failed_check(checkpoint, tmp_path, monkeypatch):
    """A parity check that fails: exit 2, no model, and the report holds the printed error and the measure."""
    import patchgen.export.parity as parity

    monkeypatch.setattr(parity, "PARITY_TOLERANCE", -1.0)
    report = tmp_path / "export.json"
    code, out, err = export(checkpoint, "-o", tmp_path / "m.onnx", "--report", report)
    assert code == 2 and out == "", err
    r = json.loads(report.read_text())
    assert r["status"] == "error" and r["files"] == [] and r["model_sha256"] is None
    assert err == f"Error: {r['error']['message']}\n" and "--skip-check writes it anyway" in err
    assert r["parity"]["max_error"] >= 0 and r["parity"]["max_error_tolerance"] == -1.0
    assert r["parity"]["prediction"] == "eps" and f"= {r['parity']['max_error']:.3g} > -1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json"]  # no ONNX file, no temporary


@pytest.mark.quick
def test_export_report_of_an_unreadable_checkpoint(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    report = tmp_path / "export.json"
    code, _, err = export(tmp_path / "c.pt", "-o", tmp_path / "m.onnx", "--report", report)
    r = json.loads(report.read_text())
    assert code == 2 and err == f"Error: {r['error']['message']}\n" and "not a readable checkpoint" in err
    assert r["status"] == "error" and r["parity"]["max_error"] is None and r["parity"]["prediction"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "export.json"]


@pytest.mark.quick
def test_an_export_report_path_that_cannot_be_written_is_refused_before_any_work(checkpoint, tmp_path):
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "old.json").write_text("mine")
    model = tmp_path / "m.onnx"
    for report, fragments in [(tmp_path / "folder.json", ["--report", "is a directory"]),
                              (tmp_path / "nowhere" / "r.json", ["--report", "does not exist"]),
                              (model, ["--report", "is the -o too"]),
                              (tmp_path / "m.onnx.0123abcd.data", ["--report", "the model's weights"]),
                              (checkpoint, ["--report", "is the checkpoint"]),
                              (tmp_path / "old.json", ["old.json already exists", "--force"])]:
        code, out, err = export(checkpoint, "-o", model, "--report", report)
        assert code == 2 and out == "" and err.startswith("Error: ") and len(err.splitlines()) == 1, err
        assert all(f in err for f in fragments), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "old.json"]
    assert (tmp_path / "old.json").read_text() == "mine"


# ---- The benchmarks read the report: a sampler whose every stderr line is reworded breaks none of them.

# patchgen-sample with every message it prints on stderr reversed, character by character.
REWORDED = ["-c", "import click, patchgen.cli.sample as sample\n"
                  "echo = click.echo\n"
                  "click.echo = lambda message=None, *a, **k: echo(None if message is None else str(message)[::-1], "
                  "*a, **k)\n"
                  "sample.main()\n"]


# patchgen-export with every line it prints (the parity lines on stdout, errors on stderr) reversed likewise.
REWORDED_EXPORT = ["-c", "import click, patchgen.cli.export as export\n"
                         "echo = click.echo\n"
                         "click.echo = lambda message=None, *a, **k: echo(None if message is None else "
                         "str(message)[::-1], *a, **k)\n"
                         "export.main()\n"]


@pytest.fixture
def benchlib(monkeypatch):
    return load_benchmark("benchlib", monkeypatch)


def test_benchmarks_read_the_report_not_the_wording(onnx_model, tmp_path, benchlib, monkeypatch):
    """benchlib's helpers, which every benchmark that runs patchgen-sample uses, against a sampler whose
    every stderr line is reversed: the plan, speed and the refused minimum all still come through."""
    monkeypatch.setattr(benchlib, "SAMPLE_CLI", REWORDED)
    r = benchlib.sample_cli(str(onnx_model), tmp_path / "b", "--memory-budget", "1G", num_images=2, steps=1)
    assert r["returncode"] == 0 and "llac rep )se(hctap" in r["stderr"], r["stderr"]  # reworded indeed
    assert 1 <= r["patch_batch"] <= 8 and r["allocation"] in ("lean", "arena") and r["threads"] == 1
    assert r["predicted_mib"] > 1 and r["s_per_image"] > 0 and r["created_out"]
    minimum, runs = benchlib.refused_minimum(str(onnx_model), tmp_path / "c", steps=1)
    assert minimum is not None and minimum > 1 and [run["returncode"] for run in runs] == [2, 2]
    assert ".0M is below" not in "".join(run["stderr"] for run in runs)  # reversed, so not what was read
    assert not (tmp_path / "c").exists()


def test_precision_reads_the_export_report_not_the_wording(checkpoint, tmp_path, monkeypatch, capsys):
    """benchmarks/precision.py's export, against a patchgen-export whose every printed line is reversed: the
    parity errors it shows, and the error of an export that fails, come from the report."""
    precision = load_benchmark("precision", monkeypatch)
    monkeypatch.setattr(sys.modules["benchlib"], "EXPORT_CLI", REWORDED_EXPORT)  # the benchlib precision uses
    runs, export_cli = [], precision.export_cli
    monkeypatch.setattr(precision, "export_cli", lambda *args: runs.append(export_cli(*args)) or runs[-1])
    report = precision.export(checkpoint, tmp_path / "m.onnx", "fp32", None)
    assert "ytirap" in runs[0]["stdout"] and "parity" not in runs[0]["stdout"]  # reworded indeed
    shown = capsys.readouterr().out
    assert f"max error {report['parity']['max_error']:.2e} (limit 0.0001)" in shown, shown
    assert report["files"][0]["path"] == str(tmp_path / "m.onnx")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(click.ClickException, match="bad.pt is not a readable checkpoint"):
        precision.export(tmp_path / "bad.pt", tmp_path / "b.onnx", "fp32", None)
    assert "tniopkcehc elbadaer" in runs[1]["stderr"]  # what it printed was reversed; the report was not


def test_no_benchmark_reads_sampler_prose_with_a_regex():
    """No `re` call in benchmarks/*.py is given a process's stderr or a log of it."""
    for path in BENCH.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "re"):
                text = ast.unparse(node)
                assert "stderr" not in text and ".log" not in text, (path.name, text)


def test_the_session_settings_a_benchmark_varies_are_a_parameter(monkeypatch):
    """session_options(overrides=...), or $PATCHGEN_SESSION_OPTIONS in a fresh process (benchlib.sample_run):
    onnxruntime's own names laid over patchgen's; anything else is one PatchgenError line."""
    from patchgen.runtime.errors import PatchgenError
    from patchgen.runtime.session import SESSION_OPTIONS_ENV, session_options

    assert not session_options().enable_mem_pattern and not session_options().enable_cpu_mem_arena
    so = session_options(overrides={"enable_mem_pattern": True, "session.disable_prepacking": "1"})
    assert so.enable_mem_pattern and so.get_session_config_entry("session.disable_prepacking") == "1"
    monkeypatch.setenv(SESSION_OPTIONS_ENV, json.dumps({"enable_cpu_mem_arena": True}))
    assert session_options().enable_cpu_mem_arena and not session_options(overrides={}).enable_cpu_mem_arena
    for text in ("[1]", "{", json.dumps({"no_such_option": 1})):
        monkeypatch.setenv(SESSION_OPTIONS_ENV, text)
        with pytest.raises(PatchgenError, match=SESSION_OPTIONS_ENV):
            session_options()
