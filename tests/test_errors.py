"""Errors name the library's arguments and the CLI words them as options (runtime/errors.py, cli/common.py):
fields in the problem and the fix, braces in paths left alone, helpers that take a fix naming arguments."""
import errno
import os

import pytest

from patchgen.cli.common import CliError, as_option, user_errors
from patchgen.runtime.errors import ArgumentError, Phrase, field
from patchgen.runtime.files import Claimed, check_free_space, claim, write_error
from patchgen.runtime.memory import MIB, BudgetTooSmall

pytestmark = pytest.mark.quick  # the whole file is in the quick tier (pyproject.toml)


def test_the_problem_and_the_fix_name_arguments():
    e = ArgumentError("{mask} must hold numbers; ", "give {init_image} with {strength}", mask=None,
                      init_image=None, strength=0.5)
    assert str(e) == "mask must hold numbers; give init_image with strength=0.5"
    assert e.worded(as_option) == "--mask must hold numbers; give --init-img with --strength 0.5"


def test_braces_that_name_no_argument_stay_as_they_are():
    """A path or an OSError's text may hold braces: only the fields of the error's own arguments are worded."""
    path = "/data/{run_dir}/a{b}/c{/d}/{{x}}/{"
    e = ArgumentError(f"cannot write {path}: No space left on device; ", "choose another {run_dir} or {other}",
                      run_dir=None)
    assert str(e) == f"cannot write {path.replace('{run_dir}', 'run_dir')}: No space left on device; " \
                     "choose another run_dir or {other}"
    assert e.worded(as_option).endswith("choose another --out or {other}")
    assert str(ArgumentError("a{b", "}{", x=None)) == "a{b}{"


def test_a_value_is_not_worded_again():
    e = ArgumentError("{mask}: no such file", "", mask="/tmp/{mask}.png")
    assert str(e) == "mask='/tmp/{mask}.png': no such file"
    assert e.worded(as_option) == "--mask /tmp/{mask}.png: no such file"


def test_a_field_for_a_name_held_in_a_variable():
    what = "init_image"
    e = ArgumentError(f"{field(what)} is a folder; ", "give an image file", **{what: "/in{1}"})
    assert e.worded(as_option) == "--init-img /in{1} is a folder; give an image file"


def test_budget_too_small_takes_an_alternative_with_braces_and_the_problems_arguments():
    e = BudgetTooSmall("decoding {init_image} needs 9M", 94 * MIB, "resize {the} image", init_image="/a{b}.png")
    assert str(e) == "decoding init_image='/a{b}.png' needs 9M; pass memory_budget='94M' or more, or resize {the} image"
    assert e.worded(as_option) == ("decoding --init-img /a{b}.png needs 9M; pass --memory-budget 94M or more, or "
                                   "resize {the} image")
    assert e.minimum == 94 * MIB


def test_a_phrase_is_worded_like_an_error():
    note = Phrase("{init_image} is 100x80: centre-cropped", init_image="/x/{y}.png")
    assert str(note) == "init_image='/x/{y}.png' is 100x80: centre-cropped"
    assert note.worded(as_option) == "--init-img /x/{y}.png is 100x80: centre-cropped"


def test_the_file_helpers_take_a_fix_that_names_arguments(tmp_path):
    elsewhere = Phrase("choose another {run_dir}", run_dir=None)
    e = write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp_path / "{a}", elsewhere)
    assert str(e).endswith("No space left on device; free some space there or choose another run_dir")
    assert e.worded(as_option) == (f"cannot write {tmp_path / '{a}'}: No space left on device; free some space there "
                                   "or choose another --out")
    plain = write_error(OSError(errno.EROFS, os.strerror(errno.EROFS)), "x", "choose another --report")
    assert str(plain) == plain.worded(as_option) == ("cannot write x: Read-only file system; choose another --report, "
                                                     "a writable one")
    with pytest.raises(ArgumentError) as full:
        check_free_space(tmp_path, 2**60, "the cache", Phrase("choose another {cache_dir}", cache_dir=None))
    assert str(full.value).endswith("choose another cache_dir")
    assert full.value.worded(as_option).endswith("choose another patchgen-train --cache-dir")


def test_a_claim_names_the_argument_to_change(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: refused as if another process held it
        os.write(fd, b"4242\n")
        with pytest.raises(Claimed) as e:
            with claim(lock, "run folder /r{y}", Phrase("wait, or choose another {run_dir}", run_dir=None)):
                pass
    finally:
        os.close(fd)
    assert str(e.value) == "run folder /r{y} is in use by process 4242; wait, or choose another run_dir"
    assert e.value.worded(as_option) == "run folder /r{y} is in use by process 4242; wait, or choose another --out"


def test_the_cli_words_an_argument_error_as_options():
    @user_errors
    def fails():
        raise ArgumentError("{repaint_jumps} resamples around kept pixels: it needs {mask} or {outpaint}", "",
                            repaint_jumps=None, mask=None, outpaint=None)
    with pytest.raises(CliError, match=r"^--repaint-jumps resamples around kept pixels: it needs --mask or "
                                       r"--outpaint$"):
        fails()


def test_quantize_keeps_the_arguments_of_the_error_it_wraps(monkeypatch):
    import patchgen.export.quantize as quantize
    from patchgen.models.data import DataSource

    def load_data(name, size):
        raise ArgumentError(f"the image cache /c{{x}}/{name} is full; ", "choose another {cache_dir}", cache_dir=None)
    monkeypatch.setattr(quantize, "load_data", load_data)
    with pytest.raises(ArgumentError) as e:
        quantize.calibration_images(DataSource(""), 16, "faces", 4, seed=0)
    assert str(e.value).startswith("cannot load calibration images (the image cache /c{x}/faces is full; choose "
                                   "another cache_dir); pass calibration_data with one of")
    assert e.value.worded(as_option).startswith("cannot load calibration images (the image cache /c{x}/faces is "
                                                "full; choose another patchgen-train --cache-dir); pass "
                                                "--calibration-data with one of")
