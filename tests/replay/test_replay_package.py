"""What importing ``spear_engine.replay`` loads: the C++ classes, not the numpy oracle."""

import subprocess
import sys

from spear_engine.replay import format as byte_format


def test_the_oracle_is_imported_on_first_use_only():
    code = (
        "import sys\n"
        "import spear_engine.replay as replay\n"
        "oracles = ('spear_engine.replay.oracle', 'spear_engine.replay.oracle_window')\n"
        "assert not any(name in sys.modules for name in oracles)\n"
        "from spear_engine.replay import NumpyReplayIndex\n"
        "assert NumpyReplayIndex.__module__ == 'spear_engine.replay.oracle'\n"
        "assert replay.NumpyBaselineWindow.__module__ == 'spear_engine.replay.oracle_window'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_cpp_index_writes_the_format_of_the_format_module():
    from spear_engine.replay import BaselineWindow, ReplayIndex

    data = ReplayIndex(seed=3).to_bytes()
    fields = byte_format.INDEX_HEADER.unpack_from(data, 0)
    assert fields[:2] == (byte_format.INDEX_MAGIC, byte_format.FORMAT_VERSION)
    assert len(data) == byte_format.INDEX_HEADER.size + byte_format.CHECKSUM.size == fields[3]
    data = BaselineWindow(capacity=4).to_bytes()
    assert byte_format.BASELINE_HEADER.unpack_from(data, 0)[:2] == (byte_format.BASELINE_MAGIC, 1)
