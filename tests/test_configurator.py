"""configurator.py: config files, then --key=value overrides, type-checked; unknown keys refused."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
batch_size = 8
learning_rate = 1e-5
image_layer = 5
init_from = "smol"
compile = False
HUMAN = "Human:"
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
