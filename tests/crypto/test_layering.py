"""crypto/ is the bottom layer: importing it loads neither torch nor the protocol layer."""

from __future__ import annotations

import subprocess
import sys


def test_importing_every_crypto_module_loads_no_torch_and_no_protocol_layer():
    # Prepare
    code = (
        "import sys, importlib, pkgutil, securefed.crypto as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'securefed.crypto.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] == 'torch' or m.startswith('securefed.protocol'))\n"
        "assert not bad, bad\n"
    )

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    # Assert
    assert proc.returncode == 0, proc.stderr
