"""Helper for test_checkpoint.py: overwrite a checkpoint and die part-way.

usage: python _ckpt_kill_worker.py PATH MODE
  MODE=external: print SAVING and save a large tree; the test SIGKILLs us mid-write.
  MODE=between-renames: SIGKILL ourselves at the second os.rename of tpflax's swap
  (old checkpoint moved aside, new one not yet in place).
"""

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tpflax  # noqa: E402

path, mode = sys.argv[1], sys.argv[2]
if mode == "external":
    # ~200 MB of incompressible data in 8 leaves: long enough to be killed while orbax writes it.
    rng = np.random.default_rng(0)
    tree = {f"w{i}": rng.random((1024, 6400), dtype=np.float32) for i in range(8)}
else:
    tree = {"w": jnp.full((64, 64), 7.0, jnp.float32), "b": jnp.arange(8, dtype=jnp.int8)}
    real_rename = os.rename

    def dying_rename(src, dst, *args, **kwargs):
        # tpflax's swap is final -> .old, then .tmp -> final: die just before the second.
        if str(src).endswith(".tpflax-tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *args, **kwargs)

    os.rename = dying_rename
print("SAVING", flush=True)
tpflax.save_checkpoint(path, tree, overwrite=True)
print("SAVED", flush=True)
