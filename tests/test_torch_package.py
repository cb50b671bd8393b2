"""normkit.torch as an optional part: its public names, and a clear ImportError without torch."""
import subprocess
import sys

import normkit.torch as nkt


def test_exports():
    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "TorchCommunicator",
                 "batch_norm", "batchnormeval", "batchnormtrain", "convert_sync_batchnorm",
                 "sync_batch_norm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
                 "InstanceNorm3d", "InstanceBatchNorm2d", "group_norm", "instance_norm"):
        assert name in nkt.__all__ and getattr(nkt, name) is not None, name


def test_import_without_torch_says_what_to_install():
    """With torch unimportable, normkit still works and normkit.torch names the fix."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, normkit\n"
            "x = np.random.default_rng(0).standard_normal((4, 3), np.float32)\n"
            "normkit.nn.BatchNorm1d(3)(x)\n"
            "try:\n"
            "    import normkit.torch\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ImportError: normkit.torch needs PyTorch: pip install torch" in proc.stdout, proc.stdout
