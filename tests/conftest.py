import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # tiny_models, tiny_tokenizers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # llava_next_jax from the checkout


# Tests that run subprocesses for minutes (test_sharding's 4-5, test_multihost's ~2): first in the
# order, so that under `make test`'s workers (pytest-xdist) one worker starts with them while the
# others take the rest, instead of one of them starting last and running alone.
SLOW_FIRST = ("test_meshes_equal_single_device", "test_two_processes_equal_one")


def pytest_configure(config):
    """One XLA compilation cache for the run's processes: the workers (pytest-xdist starts them after
    this, in the environment set here) and the subprocesses tests start, so that the tiny models'
    programs compile once rather than once a process. Tests that look at a cache of their own set
    JAX_COMPILATION_CACHE_DIR themselves."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    config.xla_cache = tempfile.mkdtemp(prefix="llava-next-jax-tests-xla-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=config.xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def pytest_unconfigure(config):
    if getattr(config, "xla_cache", None):
        shutil.rmtree(config.xla_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.name not in SLOW_FIRST)   # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def no_compilation_cache_in_home():
    """The caption script run in the test process keeps no compiled programs in ~/.cache (subprocesses
    get a session cache through `JAX_COMPILATION_CACHE_DIR`, tests/test_caption.py)."""
    from llava_next_jax import caption
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(caption, "default_compilation_cache", lambda: "none")
        yield


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A session directory for the demo model (built once) and subprocesses' shared XLA cache."""
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="session")
def demo_dir(demo_home):
    """The built-in demo model, built once per session in a temporary LLAVA_NEXT_JAX_DEMO_DIR."""
    from llava_next_jax import demo
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(demo.ENV_DIR, str(demo_home / "demo-v1"))
        yield demo.demo_model_dir(log=lambda *_: None)
