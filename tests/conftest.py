import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # tiny_models, tiny_tokenizers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # llava_next_jax from the checkout


EARLY = "test_meshes_equal_single_device"   # test_sharding's: its subprocess runs for minutes


def _early_modules(session) -> set:
    """The modules of the collected EARLY tests (none where collection failed)."""
    return {item.module for item in getattr(session, "items", []) if item.name == EARLY}


def pytest_collection_finish(session):
    """Starts the subprocess of a collected EARLY test, so that it runs beside the tests before it
    rather than after them."""
    for module in _early_modules(session):
        module.start()


def pytest_sessionfinish(session):
    """Kills that subprocess if the session ends before the test waited for it (-x, Ctrl-C)."""
    for module in _early_modules(session):
        module.stop()


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
