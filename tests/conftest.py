import importlib
import os
import socket
import subprocess
import sys
import tempfile
import time

# 8 fake CPU devices for the sharding tests; set before jax is imported anywhere. XLA:CPU's LLVM
# backend at optimization level 0: the same HLO, with about a quarter less compile time, which is
# most of a test's time here (the benchmarks and jobs compile as usual).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A fresh persistent compilation cache per run: tests that count compilations see them all.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_cache_"))
# gcsfs reads this once at import; without it a bucket-type call hangs 60 s against the emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402  (after the environment above)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """A gcp-storage-emulator on loopback; gcsfs (and fsspec's gs://) talk to it while this is up."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode()
                pytest.fail(f"gcp-storage-emulator exited with {proc.returncode}: {err}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"gcp-storage-emulator did not answer on port {port} within 30 s")
                time.sleep(0.05)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
            # Read when gcsfs is imported: its experimental class makes a gRPC call that hangs
            # against the emulator. Pin the plain class too, in case gcsfs was imported earlier.
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            import gcsfs.core

            # The module, not `fsspec.registry` (a read-only view of it).
            registry = importlib.import_module("fsspec.registry")._registry
            for protocol in ("gs", "gcs"):
                mp.setitem(registry, protocol, gcsfs.core.GCSFileSystem)
            gcsfs.core.GCSFileSystem.clear_instance_cache()  # drop clients bound to another endpoint
            fs = gcsfs.core.GCSFileSystem(token="anon", project="test")
            fs.mkdir("ckpts")
            yield fs
            gcsfs.core.GCSFileSystem.clear_instance_cache()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
