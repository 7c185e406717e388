"""Every public name has a docstring with a runnable example, and every example runs.

The examples are doctests in the modules that define the public names; they run here under the
suite's settings (shape checks on, highest matmul precision, 8 virtual CPU devices).
"""

import doctest
import inspect
from types import ModuleType

import jax
import pytest

import attnax

PUBLIC: dict[str, object] = {name: getattr(attnax, name) for name in attnax.__all__}

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Examples that shard a sequence over two devices; skipped where fewer exist (conftest gives
# CPU runs 8 virtual devices, a one-GPU machine has one).
NEEDS_TWO_DEVICES = frozenset(
    {
        "attnax.kernels.ring.api.ring_attention",
        "attnax.kernels.ring.api.sharded_ring_attention",
    }
)


def _defining_module(obj: object) -> ModuleType:
    module = inspect.getmodule(obj)
    assert module is not None, f"no module for {obj!r}"
    return module


MODULES: list[ModuleType] = sorted(
    {_defining_module(obj) for obj in PUBLIC.values()}, key=lambda module: module.__name__
)


def _public_names_of(module: ModuleType) -> list[str]:
    return sorted(name for name, obj in PUBLIC.items() if _defining_module(obj) is module)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_has_docstring_with_example(name: str) -> None:
    doc = inspect.getdoc(PUBLIC[name])
    assert doc, f"attnax.{name} has no docstring."
    summary = doc.splitlines()[0].strip()
    assert summary, f"attnax.{name}'s docstring does not start with a one-line summary."
    assert "Example:" in doc and ">>>" in doc, (
        f"attnax.{name}'s docstring has no doctest example under an `Example:` heading."
    )


def test_every_module_is_covered() -> None:
    covered = {name for module in MODULES for name in _public_names_of(module)}
    assert covered == set(PUBLIC)


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_doctests(module: ModuleType) -> None:
    tests = [test for test in doctest.DocTestFinder().find(module) if test.examples]
    found = {test.name for test in tests}
    # The finder must see each public name's docstring (a wrapper must keep __module__ and
    # __doc__), or its example would silently never run.
    unseen = [name for name in _public_names_of(module) if f"{module.__name__}.{name}" not in found]
    assert not unseen, f"doctest does not find the examples of {unseen} in {module.__name__}."

    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    failed = attempted = 0
    for test in sorted(tests, key=lambda test: test.name):
        if test.name in NEEDS_TWO_DEVICES and jax.device_count() < 2:
            continue
        results = runner.run(test, out=report.append)
        failed += results.failed
        attempted += results.attempted
    assert attempted > 0
    assert failed == 0, (
        f"{failed} of {attempted} doctest examples failed in {module.__name__}:\n" + "".join(report)
    )
