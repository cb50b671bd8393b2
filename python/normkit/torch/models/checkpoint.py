"""Checkpoints of the released networks, loaded from local files only: normkit never downloads.

The released files load as they are: a bare state dict or a ``{"state_dict": ...}`` training
checkpoint, keys with or without DataParallel's ``module.`` prefix, batch norms saved before
``num_batches_tracked`` existed, and, for a model without a classifier (a backbone), the file's
``fc.*`` dropped. Anything else that does not fit is one ValueError that lists the keys.
"""
import os
import pickle
from collections.abc import Mapping

import torch

_SHOWN = 12  # keys listed per kind of misfit; the rest are counted


def resolve_pretrained(pretrained, release, who):
    """The local path of ``pretrained`` (str or os.PathLike), or None for None/False.

    ``pretrained=True`` is the upstream spelling of "download the release": a ValueError naming
    ``release`` (the file and where to fetch it), since normkit never goes to the network.

    Parameters
    ----------
    pretrained : str, os.PathLike, bool or None
        A model builder's ``pretrained=``.
    release : str
        The released file's URL, for the message.
    who : str
        The builder, for the message.

    Returns
    -------
    str, os.PathLike or None

    Raises
    ------
    ValueError
        ``pretrained=True`` (a download).
    TypeError
        Anything else that is not a path.
    """
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        raise ValueError(f"{who}: pretrained=True would download {release}; normkit never "
                         f"downloads. Fetch that file yourself and pass its local path: "
                         f"{who}(pretrained='/path/to/{release.split('/')[-1]}')")
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"{who}: pretrained must be None or the path of a local checkpoint "
                        f"file, got {type(pretrained).__name__} (a state dict in memory loads "
                        f"with normkit.torch.models.load_checkpoint)")
    return pretrained


def read_checkpoint(path):
    """The state dict in the file at ``path``: tensors only (``weights_only=True``: a file
    cannot run code), unwrapped and without the ``module.`` prefix (see ``state_dict_of``).

    Parameters
    ----------
    path : str or os.PathLike
        A local checkpoint file.

    Returns
    -------
    dict
        Names to tensors.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file holds more than tensors and plain values, or no state dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {os.fspath(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {os.fspath(path)!r} holds more than tensors and plain "
                         f"values, so it is not read (that could run code). If you trust it, "
                         f"load it yourself (torch.load(path, weights_only=False)) and pass its "
                         f"state dict to load_checkpoint. torch said: {e}") from e
    return state_dict_of(obj, os.fspath(path))


def state_dict_of(obj, where="the checkpoint"):
    """A released checkpoint's state dict: ``obj`` itself or ``obj["state_dict"]``, with a
    ``module.`` prefix (``torch.nn.DataParallel``'s) removed when every key has it.

    Parameters
    ----------
    obj : Mapping
        A state dict, or a training checkpoint holding one under "state_dict".
    where : str
        What ``obj`` came from, for the message.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        ``obj`` is not a mapping of string keys.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{where} is not a state dict (a mapping of names to tensors, or one "
                         f"under 'state_dict'), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        return {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _fill_batch_counts(model, sd):
    """Batch norms saved before torch 0.4.1 have no ``num_batches_tracked``: count from 0 (as
    torch's own loading of such files does)."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if (getattr(m, "num_batches_tracked", None) is not None
                and f"{prefix}running_mean" in sd and f"{prefix}num_batches_tracked" not in sd):
            sd[f"{prefix}num_batches_tracked"] = torch.tensor(0, dtype=torch.long)


def _listing(title, keys):
    keys = sorted(keys)
    more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{title} ({len(keys)}): {', '.join(keys[:_SHOWN])}{more}"


def load_checkpoint(model, checkpoint, who=None):
    """Loads ``checkpoint`` (a local file path, a state dict, or a ``{"state_dict": ...}``
    checkpoint) into ``model`` strictly, after the fixes of released files above; returns
    ``model``. A file's ``fc.*`` is dropped when ``model`` has no ``fc`` (a backbone).

    Missing keys, unexpected keys and shape mismatches are one ValueError listing them, raised
    before anything is copied (the model is left as it was).

    Parameters
    ----------
    model : torch.nn.Module
        Loaded in place.
    checkpoint : str, os.PathLike or Mapping
        A local file, a state dict, or a ``{"state_dict": ...}`` checkpoint.
    who : str or None
        The model's name in messages; None: its class name.

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    ValueError
        Keys or shapes that do not fit, a file that is not a plain checkpoint.
    FileNotFoundError
        A path that does not exist.
    """
    who = who or type(model).__name__
    if isinstance(checkpoint, (str, os.PathLike)):
        where = f"checkpoint {os.fspath(checkpoint)!r}"
        sd = read_checkpoint(checkpoint)
    else:
        where = "the checkpoint"
        sd = state_dict_of(checkpoint)
    own = model.state_dict()
    if not any(k.startswith("fc.") for k in own):
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    _fill_batch_counts(model, sd)
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    missing = own.keys() - sd.keys()
    unexpected = sd.keys() - own.keys() - set(not_tensors)
    shapes = [f"{k} {tuple(sd[k].shape)} (model {tuple(own[k].shape)})"
              for k in own.keys() & (sd.keys() - set(not_tensors)) if sd[k].shape != own[k].shape]
    problems = [_listing(title, keys) for title, keys in (
        ("missing from the file", missing), ("not in the model", unexpected),
        ("not tensors", not_tensors), ("of other shapes in the file", shapes)) if keys]
    if problems:
        hint = ""
        if any(k.startswith("fc.") for k in missing | {s.split()[0] for s in shapes}):
            hint = (" (for a backbone without the file's classifier build the model with "
                    "num_classes=None; else give num_classes the file's fc size)")
        raise ValueError(f"{who}: {where} does not fit the model{hint}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model


__all__ = ["load_checkpoint", "read_checkpoint", "resolve_pretrained", "state_dict_of"]
