"""Every public class and function has a numpydoc docstring whose Parameters section names every
parameter of its signature, and nothing else (issue 16: ``help()`` must show them).

"Public": the names in a package's ``__all__`` (or, without one, the names a module defines that
do not start with "_"), for the packages below and their submodules, plus the methods of the
communicators (their protocol: allreduce_sum, allgather, split). A class documents its
constructor's parameters. ``*args`` and ``**kwargs`` are documented too, as what they forward.
"""
import importlib
import inspect
import re

import pytest

pytest.importorskip("torch")

MODULES = ["normkit", "normkit.nn", "normkit.functional", "normkit.distributed", "normkit.random",
           "normkit.torch", "normkit.torch.functional", "normkit.torch.distributed",
           "normkit.torch.convert", "normkit.torch.stochnorm", "normkit.torch.mixstyle",
           "normkit.torch.models", "normkit.torch.models.checkpoint"]
# Classes whose public methods are API in their own right (the communicator protocol).
METHODS_OF = ["normkit.distributed.MPICommunicator", "normkit.distributed.NCCLCommunicator",
              "normkit.torch.TorchCommunicator"]


def _public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
    return names


def _public_api():
    """{qualified name: object} of every public class and function, each object once (under the
    first name it is found by)."""
    found, seen = {}, set()
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in _public_names(module):
            obj = getattr(module, attr)
            if inspect.ismodule(obj) or not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            found[f"{name}.{attr}"] = obj
    for path in METHODS_OF:
        module, cls = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), cls)
        for attr, value in vars(cls).items():
            if not attr.startswith("_") and inspect.isfunction(value):
                found[f"{path}.{attr}"] = value
    return found


API = _public_api()


def _sections(doc):
    """{section title: its lines} of a numpydoc docstring (a title line underlined by dashes)."""
    lines = doc.splitlines()
    sections, current = {}, None
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) and line.strip():
            current = line.strip()
            sections[current] = []
        elif current is not None and not re.fullmatch(r"-{3,}", line.strip()):
            sections[current].append(line)
    return sections


def _documented_names(lines):
    """The parameter names of a Parameters section: its unindented "name : type" lines (or
    "a, b : type", or a bare "name")."""
    names = []
    for line in lines:
        if line and not line[0].isspace():
            head = line.split(" : ")[0]
            names += [n.strip() for n in head.split(",") if n.strip()]
    return names


def _signature_names(obj):
    """The parameter names the Parameters section must list (with * / ** for varargs), or None
    where Python has no signature (an exception class taking the message)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    names = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        names.append(prefix + p.name)
    return names


def test_the_walk_finds_the_api():
    """The walk itself: it must see the families of every package (a walk that found nothing
    would pass everything)."""
    for name in ["normkit.nn.BatchNorm2d", "normkit.functional.batch_norm_forward",
                 "normkit.distributed.MPICommunicator", "normkit.distributed.MPICommunicator.split",
                 "normkit.torch.GroupNorm", "normkit.torch.models.resnet50_ibn_a",
                 "normkit.torch.models.checkpoint.read_checkpoint", "normkit.random.resolve",
                 "normkit.torch.stochnorm.draw_channels", "normkit.manual_seed"]:
        assert name in API, name
    assert len(API) > 150


def test_the_checker_sees_a_missing_parameter():
    def documented(a, b=1):
        """Does a thing.

        Parameters
        ----------
        a : int
            The thing.
        """
    assert _documented_names(_sections(inspect.getdoc(documented))["Parameters"]) == ["a"]
    assert _signature_names(documented) == ["a", "b"]


@pytest.mark.parametrize("name", sorted(API))
def test_public_callable_documents_its_parameters(name):
    obj = API[name]
    doc = obj.__doc__  # its own: a class without one would show its base's in help()
    assert doc and doc.strip(), f"{name} has no docstring"
    doc = inspect.cleandoc(doc)
    wanted = _signature_names(obj)
    sections = _sections(doc)
    if not wanted:  # nothing to document (no parameters, or an exception's message)
        return
    assert "Parameters" in sections, f"{name}{inspect.signature(obj)}: no Parameters section"
    documented = _documented_names(sections["Parameters"])
    missing = [n for n in wanted if n not in documented]
    extra = [n for n in documented if n not in wanted]
    assert not missing, f"{name}: Parameters does not name {missing}"
    assert not extra, f"{name}: Parameters names {extra}, which the signature lacks"
