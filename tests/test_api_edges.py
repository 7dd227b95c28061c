"""The less-used corners of the public API: make_mesh's devices=, batches with odd leaves, the
mesh suggestion's messages."""

import jax
import numpy as np
import pytest

import tpflax


def test_make_mesh_with_too_few_devices_given_says_the_list_is_short():
    # the process sees 8 devices: the advice to emulate more (XLA_FLAGS) was wrong, the caller's list is short
    with pytest.raises(tpflax.DeviceError, match=r"needs 8 devices but devices= gives 6") as e:
        tpflax.make_mesh({"data": 2, "model": 4}, devices=jax.devices()[:6])
    assert "XLA_FLAGS" not in str(e.value) and "jax.devices()[:8]" in str(e.value)
    with pytest.raises(tpflax.DeviceError, match=r"devices= gives 0"):
        tpflax.make_mesh({"model": 2}, devices=[])
    # too few in the process: the emulation advice stays
    with pytest.raises(tpflax.DeviceError, match=r"only 8 are available.*xla_force_host_platform_device_count=16"):
        tpflax.make_mesh({"data": 4, "model": 4})
    # a subset, in the caller's order
    m = tpflax.make_mesh({"data": 2, "model": 2}, devices=jax.devices()[::-1][:4])
    assert [d.id for d in np.ravel(m.devices)] == [7, 6, 5, 4]
