"""Extension points chosen by name in the config (decompositions, data sources, methods,
autoencoders, metrics), as big_vision selects its modules.

Adding one touches its own file, one ``@REGISTRY.register("name")`` line and its test::

  DECOMPOSITIONS = Registry("decomposition")

  @DECOMPOSITIONS.register("laplacian")
  class Laplacian(Decomposition): ...

  DECOMPOSITIONS.get("laplacian")  # -> the class; an unknown name lists the known ones
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A name -> object table with a clear error for unknown names."""

  def __init__(self, what: str):
    self.what = what
    self._items: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator registering a class or function under ``name`` (which must be new)."""

    def add(obj: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.what} {name!r} is already registered")
      self._items[name] = obj
      return obj

    return add

  def get(self, name: str) -> T:
    """The object registered as ``name``; ValueError listing the known names otherwise."""
    if name not in self._items:
      close = difflib.get_close_matches(str(name), self._items, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ValueError(
        f"unknown {self.what} {name!r}{hint}; choose one of {', '.join(sorted(self._items))}"
      )
    return self._items[name]

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._items))

  def __contains__(self, name: str) -> bool:
    return name in self._items
