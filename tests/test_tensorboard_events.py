"""TensorBoard events without TensorFlow: the files read back through TensorFlow's own reader
(which checks every record's CRC) as tf.summary.scalar's would, and a command's start-up
leaves TensorFlow unimported until something uses it."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from cli_runner import REPO
from jaxlm import writers
from jaxlm.tensorboard_events import crc32c


def read_events(logdir):
    names = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")]
    assert len(names) == 1, names
    found = {}
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, names[0])):
        for value in event.summary.value:
            assert value.metadata.plugin_data.plugin_name == "scalars"
            array = tf.make_ndarray(value.tensor)
            assert array.dtype == np.float32 and array.shape == ()
            found[(event.step, value.tag)] = array
    return found


def test_scalars_read_back_bitwise_as_float32(tmp_path):
    writer = writers.TensorBoardWriter(str(tmp_path))
    rows = {1: {"train/loss": 6.912345678, "train/lr": np.float32(3e-4)},
            2: {"train/loss": np.float64(float("nan")), "eval/accuracy": np.array(0.25)},
            10: {"train/loss": float("inf")}}
    for step, scalars in rows.items():
        writer.write_scalars(step, scalars)
    writer.close()
    found = read_events(str(tmp_path))
    assert sorted(found) == sorted((s, t) for s, scalars in rows.items() for t in scalars)
    for (step, tag), got in found.items():
        want = np.float32(rows[step][tag])
        assert (np.isnan(got) and np.isnan(want)) or got == want, (step, tag, got, want)


def test_crc32c_of_the_standard_check_string():
    assert crc32c(b"123456789") == 0xE3069283  # The CRC-32C (Castagnoli) check value.
    assert crc32c(b"") == 0


def test_the_start_up_leaves_tensorflow_unimported_until_it_is_used():
    probe = ("import sys\n"
             "from jaxlm.commands import common\n"
             "common.hide_gpus_from_tensorflow()\n"
             "import jaxlm.train, jaxlm.evaluate\n"
             "from clu.metric_writers.tf import summary_writer\n"
             "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
             "print(int(summary_writer.tf.constant(41).numpy()) + 1)\n"  # clu's `tf`: the real one, now.
             "print(type(sys.modules['tensorflow']).__name__, sys.modules['tensorflow'].__version__ == tf_version)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", f"tf_version = {tf.__version__!r}\n{probe}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False", "42", "module", "True"], proc.stdout
