"""`AdapterDict`: an `nn.ModuleDict` keyed by adapter name, for every valid adapter name.

torch refuses a module name that holds a dot or equals an attribute of `nn.Module` (``train``,
``to``, ``half``, ...). Adapter names follow one rule, `mlora.config.adapter_name_problem`
(letters, digits, ``_ - .``), checked with the config before anything loads; so that the
model accepts every name that rule accepts, such a name is stored under an escaped key that
no valid name can be: ``~`` followed by the name with its dots written as ``~``. Every other
name is its own key, so parameter paths read as before (``...adapters.arc_e_0.lora_A``).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

_ESCAPE = "~"  # not allowed in adapter names
_RESERVED = frozenset(dir(nn.ModuleDict()))


def _key(name: str) -> str:
    if "." in name or name in _RESERVED:
        return _ESCAPE + name.replace(".", _ESCAPE)
    return name


def _name(key: str) -> str:
    return key[1:].replace(_ESCAPE, ".") if key.startswith(_ESCAPE) else key


class AdapterDict(nn.ModuleDict):
    """`nn.ModuleDict` whose keys are adapter names (any valid one); iterates over names."""

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(_key(name))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(_key(name), module)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(_key(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(_key(name))

    def __iter__(self) -> Iterator[str]:
        return (_name(k) for k in super().__iter__())

    def keys(self):
        return list(self)

    def items(self):
        return [(_name(k), m) for k, m in super().items()]
