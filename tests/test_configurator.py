"""configurator.py: config files, then --key=value overrides, type-checked; unknown keys refused."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
batch_size = 8
learning_rate = 1e-5
image_layer = 5
init_from = "smol"
compile = False
dtype = "float32"
HUMAN = "Human:"
CONFIG_TYPES = {{"image_layer": (int, list)}}
POSITIVE = ("batch_size", "learning_rate")
CHOICES = {{"dtype": ("float32", "bfloat16")}}
exec(open({configurator!r}).read())
print("RESULT", batch_size, learning_rate, image_layer, init_from, compile)
"""


def run(tmp_path, *args):
    script = tmp_path / "stage.py"
    script.write_text(SCRIPT.format(configurator=str(ROOT / "configurator.py")))
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path)
    return p.returncode, p.stdout, p.stderr


def test_config_file_then_overrides_in_order(tmp_path):
    (tmp_path / "cfg.py").write_text("batch_size = 4\ninit_from = 'llava'\n")
    rc, out, err = run(tmp_path, "cfg.py", "--batch_size=2", "--learning_rate=3", "--image_layer=[1,2,3]", "--compile")
    assert rc == 0, err
    assert "RESULT 2 3.0 [1, 2, 3] llava True" in out


def test_unknown_key_is_refused_with_the_known_ones(tmp_path):
    rc, _, err = run(tmp_path, "--batchsize=2")
    assert rc == 1 and "unknown config key 'batchsize'" in err and "batch_size" in err
    assert len(err.strip().splitlines()) == 1


def test_wrong_type_and_missing_file_are_one_line_errors(tmp_path):
    rc, _, err = run(tmp_path, "--batch_size=big")
    assert rc == 1 and "batch_size='big' has type str, expected int" in err
    rc, _, err = run(tmp_path, "nope.py")
    assert rc == 1 and "nope.py: config file not found" in err
    (tmp_path / "bad.py").write_text("learning_rat = 1.0\n")
    rc, _, err = run(tmp_path, "bad.py")
    assert rc == 1 and "bad.py: unknown config key 'learning_rat'" in err


def test_upper_case_constants_are_not_config_keys(tmp_path):
    rc, _, err = run(tmp_path, "--HUMAN=User:")
    assert rc == 1 and "unknown config key 'HUMAN'" in err and "HUMAN" not in err.split("known keys:")[1]


def test_a_config_file_with_a_syntax_error_is_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "bad.py").write_text("batch_size = 4\nlearning_rate = (1e-5\n")
    rc, _, err = run(tmp_path, "bad.py")
    assert rc == 1 and err.startswith("error: bad.py:2: syntax error") and len(err.strip().splitlines()) == 1
    (tmp_path / "bad2.py").write_text("batch_size = 4\nlearning_rate = undefined_name\n")
    rc, _, err = run(tmp_path, "bad2.py")
    assert rc == 1 and "bad2.py:2: NameError" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=None", "batch_size=None has type NoneType, expected int"),
    ("--batch_size=[1, 2]", "batch_size=[1, 2] has type list, expected int"),
    ("--batch_size=2.5", "batch_size=2.5 has type float, expected int"),
    ("--batch_size=True", "batch_size=True has type bool, expected int"),
    ("--compile=1", "compile=1 has type int, expected bool"),
    ("--image_layer=None", "image_layer=None has type NoneType, expected int or list"),
    ("--config_keys=['x']", "unknown config key 'config_keys'"),
    ("--batch_size=0", "batch_size=0; expected a number > 0"),
    ("--batch_size=-4", "batch_size=-4; expected a number > 0"),
    ("--learning_rate=0", "learning_rate=0.0; expected a number > 0"),
    ("--dtype=float64", "dtype='float64'; expected one of 'float32', 'bfloat16'"),
])
def test_bad_values_are_refused_with_one_line(tmp_path, arg, message):
    rc, _, err = run(tmp_path, arg)
    assert rc == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_config_keys_list_is_what_can_be_set(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(f"a = 1\nb = 2\nconfig_keys = ['a']\nexec(open({str(ROOT / 'configurator.py')!r}).read())\n"
                      "print('RESULT', a, b)\n")
    ok = subprocess.run([sys.executable, str(script), "--a=3"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and "RESULT 3 2" in ok.stdout
    bad = subprocess.run([sys.executable, str(script), "--b=3"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "unknown config key 'b'" in bad.stderr
