"""The process-wide random generator of normkit.nn's stochastic layers.

Layers given ``generator=`` (a ``numpy.random.Generator``) draw from it; the others draw from this
module's generator, which ``normkit.manual_seed(seed)`` reseeds. Global NumPy and Python random
state are never used, so seeding normkit reproduces its layers' draws whatever else the program
draws.
"""
import numpy as np

_default = np.random.default_rng()


def manual_seed(seed):
    """Reseeds the default generator of normkit.nn's stochastic layers; returns it.

    Parameters
    ----------
    seed : int, sequence of int or None
        Anything ``numpy.random.default_rng`` takes.

    Returns
    -------
    numpy.random.Generator
        The new default generator.
    """
    global _default
    _default = np.random.default_rng(seed)
    return _default


def default_generator():
    """The generator that layers without their own ``generator=`` draw from."""
    return _default


def resolve(generator, who):
    """``generator`` if it is a ``numpy.random.Generator``, the default one if it is None.

    Parameters
    ----------
    generator : numpy.random.Generator or None
        A layer's ``generator=``.
    who : str
        The layer, for the message.

    Returns
    -------
    numpy.random.Generator

    Raises
    ------
    TypeError
        ``generator`` is something else (a seed, a RandomState).
    """
    if generator is None:
        return _default
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f"{who}: generator must be a numpy.random.Generator (e.g. "
                        f"numpy.random.default_rng(seed)), got {type(generator).__name__}")
    return generator
